"""moejax: a compiler-pass framework for Mixture-of-Experts inference in JAX."""
from moejax import dialect

__version__ = "0.1.0"
