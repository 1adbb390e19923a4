"""transformer-jax: the Transformer of "Attention Is All You Need" in JAX/Flax."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transformer_jax.config import ModelConfig

if TYPE_CHECKING:
    from transformer_jax.inference.translator import Translator, load

__all__ = ["ModelConfig", "Translator", "load"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # load/Translator pull in orbax and the data stack; import them only when asked for.
    if name in ("load", "Translator"):
        from transformer_jax.inference import translator

        return getattr(translator, name)
    raise AttributeError(f"module 'transformer_jax' has no attribute {name!r}")
