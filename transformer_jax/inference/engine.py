"""Decoding settings and the JAX engine: the decoders jitted on a mesh, compiled per shape.

`JaxEngine.decode_rows` is the `evaluation.DecodeRows` the loop and Translator hand to
`evaluation.translate`: this process's padded source rows in, its token rows out, with the
global batch split over the mesh's data axes in between.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal, get_args

import jax
import numpy as np
from jax.sharding import Mesh

from transformer_jax import sharding
from transformer_jax.config import ModelConfig
from transformer_jax.evaluation import Decoded, DecodeRows
from transformer_jax.inference import decode
from transformer_jax.model import Decodable, Transformer

Method = Literal["beam", "greedy", "sample"]


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """How to decode; the defaults are the paper's (section 6.1): beam 4, alpha 0.6, input + 50."""

    method: Method = "beam"
    beam_size: int = 4
    alpha: float = 0.6  # GNMT length penalty exponent
    extra_length: int = 50  # output cap = source length + extra_length
    max_length: int | None = None  # static output buffer cap; None = the model's max_len
    temperature: float = 1.0  # method="sample" only
    top_k: int = 0  # method="sample" only; 0 = the whole vocabulary
    seed: int = 0  # method="sample" only
    nbest: int = 1  # hypotheses returned per sentence (beam: at most beam_size)

    def __post_init__(self) -> None:
        checks = [
            (self.method in get_args(Method), "method", f"is not one of {list(get_args(Method))}"),
            (self.beam_size >= 1, "beam_size", "must be >= 1"),
            (self.alpha >= 0, "alpha", "must be >= 0"),
            (self.extra_length >= 0, "extra_length", "must be >= 0"),
            (self.max_length is None or self.max_length >= 1, "max_length", "must be >= 1"),
            (self.temperature >= 0, "temperature", "must be >= 0"),
            (self.top_k >= 0, "top_k", "must be >= 0 (0 = no cut)"),
            (self.nbest >= 1, "nbest", "must be >= 1"),
            (
                self.nbest <= (self.beam_size if self.method == "beam" else 1),
                "nbest",
                f"must be at most {self.beam_size if self.method == 'beam' else 1} for "
                f"method={self.method!r}" + (" (the beam size)" if self.method == "beam" else ""),
            ),
        ]
        for ok, field, message in checks:
            if not ok:
                raise ValueError(f"{field}={getattr(self, field)!r}: {message}")

    def output_length(self, src_len: int, model_max_len: int) -> int:
        """The static output buffer for sources padded to src_len."""
        cap = model_max_len if self.max_length is None else min(self.max_length, model_max_len)
        return min(src_len + self.extra_length, cap)


class JaxEngine:
    """A model's decoders jitted for one mesh; one compile per (settings, source length)."""

    def __init__(
        self,
        config: ModelConfig,
        mesh: Mesh,
        rules: sharding.LogicalRules,
        model: Decodable | None = None,
    ) -> None:
        self.config = config
        # Transformer(config) unless given: an Ensemble decodes its members as one model.
        self.model: Decodable = model if model is not None else Transformer(config)
        self.mesh = mesh
        self.rules = rules
        self._rows = sharding.batch_sharding(mesh)
        self._compiled: dict[tuple[Any, ...], Callable[..., Any]] = {}

    def decode_rows(
        self, params: Any, settings: DecodeSettings, src_rows: np.ndarray, number: int
    ) -> Decoded:
        """Decode this process's rows [b, S] (all processes call together); its n best."""
        fn = self._decoder(settings, src_rows.shape[1])
        rng = jax.random.fold_in(jax.random.key(settings.seed), number)
        src = sharding.to_global({"inputs": src_rows}, self._rows)["inputs"]
        with sharding.context(self.mesh, self.rules):
            tokens, scores = fn(params, src, rng)
        return Decoded(
            tokens=sharding.host_local_rows(tokens), scores=sharding.host_local_rows(scores)
        )

    def bind(self, params: Any, settings: DecodeSettings) -> DecodeRows:
        """decode_rows with the parameters and settings fixed (an evaluation.DecodeRows)."""
        return functools.partial(self.decode_rows, params, settings)

    def compiled(self, settings: DecodeSettings, src_len: int) -> Any:
        """The jitted decoder for these settings and source length (for AOT lowering too)."""
        return self._decoder(settings, src_len)

    def _decoder(self, settings: DecodeSettings, src_len: int) -> Callable[..., Any]:
        # The seed does not change the program; everything else may.
        key = (dataclasses.replace(settings, seed=0), src_len)
        if key not in self._compiled:
            self._compiled[key] = jax.jit(
                self._decode_fn(settings, settings.output_length(src_len, self.config.max_len)),
                out_shardings=self._rows,
            )
        return self._compiled[key]

    def _decode_fn(self, s: DecodeSettings, max_length: int) -> Callable[..., Any]:
        """(params, src, rng) -> ([B, N, T] tokens, [B, N] scores) for these settings."""
        model = self.model
        extra, alpha = s.extra_length, s.alpha

        def greedy(params: Any, src: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
            tokens, scores = decode.greedy_decode(
                model,
                params,
                src,
                max_length=max_length,
                extra_length=extra,
                alpha=alpha,
                return_scores=True,
            )
            return _one_best(tokens, scores)

        def beam(params: Any, src: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
            return decode.beam_search(
                model,
                params,
                src,
                beam_size=s.beam_size,
                alpha=alpha,
                max_length=max_length,
                extra_length=extra,
                num_hypotheses=s.nbest,
            )

        def sample(params: Any, src: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
            tokens, scores = decode.sample_decode(
                model,
                params,
                src,
                rng,
                temperature=s.temperature,
                top_k=s.top_k,
                max_length=max_length,
                extra_length=extra,
                alpha=alpha,
                return_scores=True,
            )
            return _one_best(tokens, scores)

        if s.method == "greedy" or (s.method == "beam" and s.beam_size == 1):
            return greedy
        return beam if s.method == "beam" else sample


def _one_best(tokens_BxT: jax.Array, scores_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    return tokens_BxT[:, None], scores_B[:, None]
