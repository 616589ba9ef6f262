"""alignkit.rollouts"""
