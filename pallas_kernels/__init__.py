"""moejax.pallas_kernels"""
