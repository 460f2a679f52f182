"""lmexp: language-model experiments composed with Hydra and run with Lightning."""

__version__ = "0.1.0"
