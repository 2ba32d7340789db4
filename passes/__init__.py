"""moejax.passes"""
