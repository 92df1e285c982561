"""jaxbert: a small, clean and fast BERT stack in JAX + Equinox + Optax."""

__version__ = "0.1.0"
