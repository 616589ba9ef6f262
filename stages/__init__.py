"""alignkit.stages"""
