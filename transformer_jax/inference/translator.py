"""load(workdir) -> Translator: a trained model, its tokenizer and batched decoding."""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import Mesh
from tqdm import tqdm

from transformer_jax.config import EOS_ID, ModelConfig
from transformer_jax.data import pipeline
from transformer_jax.data.tokenizer import Tokenizer, check_vocab
from transformer_jax.inference import decode
from transformer_jax.model import Transformer
from transformer_jax.training import checkpoint, sharding

log = logging.getLogger(__name__)

Method = Literal["beam", "greedy", "sample"]


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
    _compiled: dict[tuple[Any, ...], Callable[..., Any]] = dataclasses.field(
        default_factory=dict, repr=False
    )

    @property
    def model(self) -> Transformer:
        """The flax module (pure: pass params to apply)."""
        return Transformer(self.config)

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
        (default: the model's max_len) are truncated with a warning.
        """
        max_source_length = max_source_length or self.config.max_len
        if max_source_length > self.config.max_len:
            raise ValueError(
                f"max_source_length={max_source_length} exceeds the model's max_len="
                f"{self.config.max_len}"
            )
        batch_size = _round_up(batch_size, jax.local_device_count())
        outputs = ["" for _ in sentences]
        todo = [i for i, s in enumerate(sentences) if s.strip()]
        if not todo:
            return outputs
        batches = pipeline.make_eval_batches(
            [(sentences[i], "") for i in todo],
            self.tokenizer,
            batch_size=batch_size,
            max_source_length=_bucket(
                max(len(self.tokenizer.encode(sentences[i])) + 1 for i in todo),
                max_source_length,
            ),
        )
        key = jax.random.key(seed)
        data_sharding = sharding.batch_sharding(self.mesh)
        iterator = tqdm(
            batches, desc="translating", unit="batch", file=sys.stderr, disable=not progress
        )
        for b, batch in enumerate(iterator):
            src = jax.make_array_from_process_local_data(data_sharding, batch["inputs"])
            fn = self._decoder(
                method,
                beam_size,
                alpha,
                batch["inputs"].shape[1],
                extra_length,
                temperature,
                top_k,
            )
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
                tokens = fn(self.params, src, jax.random.fold_in(key, b))
            tokens = np.asarray(jax.device_get(tokens))
            for row, index in enumerate(batch["index"]):
                if index >= 0:
                    outputs[todo[int(index)]] = self.tokenizer.decode(tokens[row])
        return outputs

    def attention_weights(self, source: str, target: str | None = None) -> AttentionMaps:
        """Attention maps for (source, target); target defaults to the model's translation."""
        if target is None:
            target = self.translate([source])[0]
        src = np.asarray([[*self.tokenizer.encode(source), EOS_ID]], np.int32)
        tgt = np.asarray([[*self.tokenizer.encode(target), EOS_ID]], np.int32)
        # The sown probabilities exist only in the einsum implementation; they are identical.
        model = Transformer(self.config.replace(attention_impl="einsum"))
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
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

        piece = self.tokenizer.processor.id_to_piece
        return AttentionMaps(
            source_tokens=[piece(int(i)) for i in src[0]],
            target_tokens=[piece(int(i)) for i in tgt[0]],
            encoder_self=stack("encoder", self.config.num_encoder_layers, "self_attention"),
            decoder_self=stack("decoder", self.config.num_decoder_layers, "self_attention"),
            cross=stack("decoder", self.config.num_decoder_layers, "cross_attention"),
        )

    def _decoder(
        self,
        method: Method,
        beam_size: int,
        alpha: float,
        src_len: int,
        extra_length: int,
        temperature: float,
        top_k: int,
    ) -> Callable[..., Any]:
        """One jitted decoder per (method, settings, source bucket), compiled on first use."""
        max_length = min(src_len + extra_length, self.config.max_len)
        key = (method, beam_size, alpha, src_len, max_length, extra_length, temperature, top_k)
        if key not in self._compiled:
            model = self.model
            if method == "greedy" or (method == "beam" and beam_size == 1):
                fn = functools.partial(
                    decode.greedy_decode, model, max_length=max_length, extra_length=extra_length
                )
                self._compiled[key] = jax.jit(lambda params, src, rng: fn(params, src))
            elif method == "beam":
                beam = functools.partial(
                    decode.beam_search,
                    model,
                    beam_size=beam_size,
                    alpha=alpha,
                    max_length=max_length,
                    extra_length=extra_length,
                )
                self._compiled[key] = jax.jit(lambda params, src, rng: beam(params, src)[0])
            elif method == "sample":
                sample = functools.partial(
                    decode.sample_decode,
                    model,
                    temperature=temperature,
                    top_k=top_k,
                    max_length=max_length,
                    extra_length=extra_length,
                )
                self._compiled[key] = jax.jit(lambda params, src, rng: sample(params, src, rng))
            else:
                raise ValueError(f"method: {method!r} is not one of beam, greedy, sample")
        return self._compiled[key]


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, -(-value // multiple) * multiple)


def _bucket(length: int, limit: int) -> int:
    """Pad source lengths to a power of two (>= 16) so a few shapes cover every batch."""
    bucket = 16
    while bucket < length:
        bucket *= 2
    return min(bucket, limit)


def abstract_params(config: ModelConfig, mesh: Mesh, rules: sharding.LogicalRules) -> Any:
    """Shapes, dtypes and mesh shardings of the parameters, without allocating them."""
    boxed = jax.eval_shape(
        lambda: Transformer(config).init(
            jax.random.key(0), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32)
        )["params"]
    )
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.unbox(boxed),
        shardings,
    )


def load(
    workdir: epath.PathLike,
    step: int | None = None,
    *,
    mesh_shape: dict[str, int] | None = None,
    logical_axis_rules: Sequence[Sequence[Any]] | None = None,
) -> Translator:
    """Open a workdir: its model config, tokenizer and the parameters of one checkpoint.

    step=None takes the newest checkpoint. Hyperparameters come from the workdir's
    model_config.json, so nothing has to be repeated. mesh_shape defaults to all devices in
    data parallel (parameters replicated); pass e.g. {"data": 1, "fsdp": -1} to shard them.
    """
    workdir = checkpoint.workdir_path(workdir)
    config_path = workdir / checkpoint.MODEL_CONFIG_FILE
    if not config_path.exists():
        raise FileNotFoundError(
            f"{workdir}: no {checkpoint.MODEL_CONFIG_FILE}; not a transformer-jax workdir "
            "(python train.py --workdir=DIR creates one)"
        )
    config = ModelConfig.load(config_path)
    tokenizer = Tokenizer.load(workdir / checkpoint.TOKENIZER_FILE)
    check_vocab(tokenizer, config.vocab_size, str(workdir))
    mesh = sharding.make_mesh(mesh_shape or {"data": -1})
    rules = sharding.rules_from_config(logical_axis_rules)
    params, step = checkpoint.restore_params(workdir, step, abstract_params(config, mesh, rules))
    log.info("Loaded %s step %d (%s)", workdir, step, config)
    return Translator(
        config=config,
        params=params,
        tokenizer=tokenizer,
        step=step,
        workdir=workdir,
        mesh=mesh,
        rules=rules,
    )
