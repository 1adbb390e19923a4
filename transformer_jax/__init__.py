"""transformer-jax: the Transformer of "Attention Is All You Need" in JAX/Flax."""

from transformer_jax.config import ModelConfig

__all__ = ["ModelConfig"]
__version__ = "0.1.0"
