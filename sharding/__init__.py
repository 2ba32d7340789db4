"""moejax.sharding"""
