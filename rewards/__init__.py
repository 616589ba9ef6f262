"""alignkit.rewards"""
