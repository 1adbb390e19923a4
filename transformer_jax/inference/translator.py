"""load(workdir) -> Translator: a trained model, its tokenizer and batched decoding."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Sequence
from typing import Any, Literal

import jax
import numpy as np
from etils import epath
from jax.sharding import Mesh

from transformer_jax import evaluation, sharding
from transformer_jax.config import EOS_ID, ModelConfig
from transformer_jax.data.tokenizer import Tokenizer
from transformer_jax.inference.ctranslate2_engine import CTranslate2Engine
from transformer_jax.inference.engine import DecodeSettings, JaxEngine, Method
from transformer_jax.model import Transformer
from transformer_jax.state import abstract_train_state
from transformer_jax.workdir import Workdir

log = logging.getLogger(__name__)


@dataclasses.dataclass
class AttentionMaps:
    """Attention probabilities of one sentence pair, per layer and head, as numpy arrays."""

    source_tokens: list[str]  # S pieces, EOS included
    target_tokens: list[str]  # T pieces (the decoder's outputs), EOS included
    encoder_self: np.ndarray  # [layers, heads, S, S]
    decoder_self: np.ndarray  # [layers, heads, T, T]
    cross: np.ndarray  # [layers, heads, T, S]: target position t attending to source s


@dataclasses.dataclass
class Translator:
    """A workdir's model, parameters and tokenizer, ready to translate."""

    config: ModelConfig
    params: Any
    tokenizer: Tokenizer
    step: int
    workdir: epath.Path
    mesh: Mesh
    rules: sharding.LogicalRules
    # Another engine with bind(params, settings) -> DecodeRows (CTranslate2); None: JAX.
    backend: Any = None

    @property
    def model(self) -> Transformer:
        """The flax module (pure: pass params to apply)."""
        return Transformer(self.config)

    @functools.cached_property
    def engine(self) -> Any:
        """What decodes: the JAX engine (jitted per settings and source bucket) or `backend`."""
        if self.backend is not None:
            return self.backend
        return JaxEngine(self.config, self.mesh, self.rules)

    def translate(
        self,
        sentences: Sequence[str],
        *,
        beam_size: int = 4,
        alpha: float = 0.6,
        method: Method = "beam",
        batch_size: int = 32,
        max_source_length: int | None = None,
        extra_length: int = 50,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        progress: bool = False,
    ) -> list[str]:
        """Translate each sentence (paper defaults: beam 4, alpha 0.6, length input + 50).

        Empty lines give empty translations; inputs longer than max_source_length tokens
        (default: the model's max_len) are truncated with a warning. On several processes
        every process passes the same sentences and gets every translation back; each decodes
        its share (batch_size rows per process and batch).
        """
        best = self.translate_nbest(
            sentences,
            nbest=1,
            beam_size=beam_size,
            alpha=alpha,
            method=method,
            batch_size=batch_size,
            max_source_length=max_source_length,
            extra_length=extra_length,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
            progress=progress,
        )
        return [hypotheses[0][0] if hypotheses else "" for hypotheses in best]

    def translate_nbest(
        self,
        sentences: Sequence[str],
        *,
        nbest: int,
        beam_size: int = 4,
        alpha: float = 0.6,
        method: Method = "beam",
        batch_size: int = 32,
        max_source_length: int | None = None,
        extra_length: int = 50,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        progress: bool = False,
    ) -> list[evaluation.Hypotheses]:
        """Each sentence's nbest (text, score) pairs, best first; [] for an empty line.

        The score is the engine's: for the JAX engine log P(Y|X) / ((5 + |Y|) / 6) ** alpha
        with |Y| counting EOS, for every method (greedy and sampling too).
        """
        max_source_length = max_source_length or self.config.max_len
        if max_source_length > self.config.max_len:
            raise ValueError(
                f"max_source_length={max_source_length} exceeds the model's max_len="
                f"{self.config.max_len}"
            )
        settings = DecodeSettings(
            method=method,
            beam_size=beam_size,
            alpha=alpha,
            extra_length=extra_length,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
            nbest=nbest,
        )
        return evaluation.translate_nbest(
            self.engine.bind(self.params, settings),
            self.tokenizer,
            sentences,
            batch_size=_round_up(batch_size, jax.local_device_count()),
            max_source_length=max_source_length,
            progress=progress,
        )

    def attention_weights(self, source: str, target: str | None = None) -> AttentionMaps:
        """Attention maps for (source, target); target defaults to the model's translation."""
        if self.params is None:
            raise ValueError(
                "attention_weights needs the JAX model: load the training workdir, not the "
                "CTranslate2 export"
            )
        if target is None:
            target = self.translate([source])[0]
        src = np.asarray([[*self.tokenizer.encode(source), EOS_ID]], np.int32)
        tgt = np.asarray([[*self.tokenizer.encode(target, side="target"), EOS_ID]], np.int32)
        # The sown probabilities exist only in the einsum implementation; they are identical.
        model = Transformer(self.config.replace(attention_impl="einsum"))
        with sharding.context(self.mesh, self.rules):
            _, state = model.apply({"params": self.params}, src, tgt, mutable=["intermediates"])
        found = state["intermediates"]

        def stack(stack_name: str, layers: int, module: str) -> np.ndarray:
            tree = found[stack_name]
            if "layers" in tree:  # scan_layers: one sown array with a leading layer axis
                return np.asarray(tree["layers"][module]["attention_weights"][0])[:, 0]
            maps = [
                np.asarray(tree[f"layer_{i}"][module]["attention_weights"][0][0])
                for i in range(layers)
            ]
            return np.stack(maps)

        piece = self.tokenizer.id_to_piece
        return AttentionMaps(
            source_tokens=[piece(int(i)) for i in src[0]],
            target_tokens=[piece(int(i)) for i in tgt[0]],
            encoder_self=stack("encoder", self.config.num_encoder_layers, "self_attention"),
            decoder_self=stack("decoder", self.config.num_decoder_layers, "self_attention"),
            cross=stack("decoder", self.config.num_decoder_layers, "cross_attention"),
        )


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, -(-value // multiple) * multiple)


def load(
    workdir: epath.PathLike,
    step: int | None = None,
    *,
    mesh_shape: dict[str, int] | None = None,
    logical_axis_rules: Sequence[Sequence[Any]] | None = None,
    engine: Literal["jax", "ctranslate2"] = "jax",
    device: str = "cpu",
    compute_type: str = "default",
) -> Translator:
    """Open a workdir: its model config, tokenizer and the parameters of one checkpoint.

    step=None takes the newest readable checkpoint. Hyperparameters come from the workdir's
    model_config.json, so nothing has to be repeated. mesh_shape defaults to all devices in
    data parallel (parameters replicated); pass e.g. {"data": 1, "fsdp": -1} to shard them.
    engine="ctranslate2" opens a model exported by `python -m transformer_jax.export` instead
    (workdir is then the exported folder; device and compute_type go to CTranslate2).
    """
    mesh = sharding.make_mesh(mesh_shape or sharding.DATA_PARALLEL)
    # Each process feeds its own sentences: a 'tensor' group across processes would mix them.
    sharding.check_mesh_feeds_consistent_rows(mesh)
    rules = sharding.rules_from_config(logical_axis_rules)
    if engine == "ctranslate2":
        backend = CTranslate2Engine(workdir, device=device, compute_type=compute_type)
        return Translator(
            config=backend.config,
            params=None,
            tokenizer=backend.tokenizer,
            step=int(backend.meta["step"]),
            workdir=epath.Path(os.fspath(workdir)),
            mesh=mesh,
            rules=rules,
            backend=backend,
        )
    run = Workdir(workdir)
    config = run.read_model_config()
    tokenizer = run.load_tokenizer(config.vocab_size)
    abstract = abstract_train_state(config, mesh, rules).params
    params, step = run.restore_params(step, abstract)
    log.info("Loaded %s step %d (%s)", run, step, config)
    return Translator(
        config=config,
        params=params,
        tokenizer=tokenizer,
        step=step,
        workdir=run.path,
        mesh=mesh,
        rules=rules,
    )
