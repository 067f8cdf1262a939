"""factory: a Ray-based, elastic data factory for guided-diffusion synthetic training sets."""

__version__ = "0.1.0"
