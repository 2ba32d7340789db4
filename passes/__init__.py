"""Model-level passes (survey section 3). Importing this package registers them."""
from moejax.passes.select_impl import SelectImpl

__all__ = ["SelectImpl"]
