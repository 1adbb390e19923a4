"""Several Transformers over one vocabulary, decoded as one model (as fairseq and Marian ensemble).

`Ensemble` has the methods the decoders call on a Transformer (encode, decode with a cache), and
its decode returns, per position, the mean of the members' log-probabilities. The decoders then
take log_softmax of that, as they do of a model's logits: greedy and beam search follow the
renormalized geometric mean of the members' distributions, and a model ensembled with itself
decodes exactly as it does alone. Members may differ in size and layout (scanned or not); they
must share the vocabulary, the decoder's start token, and the tokenizer (checked by `load`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.config import ModelConfig
from transformer_jax.model.transformer import Transformer

Array = jax.Array


def check_members(configs: Sequence[ModelConfig]) -> None:
    """Raise ValueError naming the field if these models cannot decode as one ensemble."""
    if not configs:
        raise ValueError("an ensemble needs at least one model")
    first = configs[0]
    for i, config in enumerate(configs[1:], start=1):
        for field in ("vocab_size", "decoder_start_id"):
            if getattr(config, field) != getattr(first, field):
                raise ValueError(
                    f"ensemble member {i}: ModelConfig.{field}={getattr(config, field)} but "
                    f"member 0 has {getattr(first, field)}; members must share the vocabulary"
                )
        for field in ("quantization", "kv_cache"):
            if getattr(config, field) != getattr(first, field):
                raise ValueError(
                    f"--{field}: ensemble member {i} is {getattr(config, field)!r} but member 0 "
                    f"is {getattr(first, field)!r}; an ensemble decodes every member at one "
                    f"precision, so give one --{field} (load(..., {field}=...)) for all"
                )


class Ensemble(nn.Module):
    """Transformers decoded together: params {"members_0": ..., "members_1": ...}."""

    configs: tuple[ModelConfig, ...]

    def setup(self) -> None:
        check_members(self.configs)
        self.members = [Transformer(c) for c in self.configs]

    @property
    def config(self) -> ModelConfig:
        """The config decoders read (vocabulary, start token); max_len is the members' least.

        attention_window is the members' largest (None if any has none): the decoding cache
        then keeps as many slots as the widest member needs, and each member's own window
        hides the slots it may not read.
        """
        windows = [c.attention_window for c in self.configs]
        window = None if None in windows else max(w for w in windows if w is not None)
        return self.configs[0].replace(
            max_len=min(c.max_len for c in self.configs), attention_window=window
        )

    def encode(
        self,
        src_ids_BxS: Array,
        src_segment_ids_BxS: Array | None = None,
        src_positions_BxS: Array | None = None,
        *,
        deterministic: bool = True,
    ) -> tuple[Array, ...]:
        """Each member's encoder output."""
        return tuple(
            m.encode(
                src_ids_BxS, src_segment_ids_BxS, src_positions_BxS, deterministic=deterministic
            )
            for m in self.members
        )

    def decode(
        self,
        encoded: tuple[Array, ...],
        src_ids_BxS: Array,
        tgt_ids_BxT: Array,
        src_segment_ids_BxS: Array | None = None,
        tgt_segment_ids_BxT: Array | None = None,
        tgt_positions_BxT: Array | None = None,
        *,
        deterministic: bool = True,
        decode: bool = False,
    ) -> Array:
        """Mean log-probabilities [B, T, V] (float32); decode=True steps every member's cache."""
        logp = [
            jax.nn.log_softmax(
                m.decode(
                    enc,
                    src_ids_BxS,
                    tgt_ids_BxT,
                    src_segment_ids_BxS,
                    tgt_segment_ids_BxT,
                    tgt_positions_BxT,
                    deterministic=deterministic,
                    decode=decode,
                )
            )
            for m, enc in zip(self.members, encoded, strict=True)
        ]
        return jnp.mean(jnp.stack(logp), axis=0)

    def __call__(self, src_ids_BxS: Array, tgt_ids_BxT: Array, **kwargs: Any) -> Array:
        """Teacher-forced mean log-probabilities [B, T, V]."""
        return self.decode(self.encode(src_ids_BxS), src_ids_BxS, tgt_ids_BxT, **kwargs)
