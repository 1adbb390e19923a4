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
from transformer_jax.inference.quantize import check_names, quantize
from transformer_jax.model import Decodable, Ensemble, Transformer, check_members
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
    # An ensemble's models ((workdir, step) each; params then {"members_0": ..., ...}); a single
    # model has none. config is then the ensemble's (the first member's, least max_len).
    members: tuple[tuple[str, int], ...] = ()
    member_configs: tuple[ModelConfig, ...] = ()

    @property
    def model(self) -> Decodable:
        """The flax module (pure: pass params to apply); an Ensemble for several models."""
        if self.member_configs:
            return Ensemble(self.member_configs)
        return Transformer(self.config)

    @functools.cached_property
    def engine(self) -> Any:
        """What decodes: the JAX engine (jitted per settings and source bucket) or `backend`."""
        if self.backend is not None:
            return self.backend
        return JaxEngine(self.config, self.mesh, self.rules, self.model)

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
        if self.member_configs:
            raise ValueError(
                "attention_weights: an ensemble has no single attention; load one model"
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
    workdir: epath.PathLike | Sequence[epath.PathLike],
    step: int | Sequence[int | None] | None = None,
    *,
    mesh_shape: dict[str, int] | None = None,
    logical_axis_rules: Sequence[Sequence[Any]] | None = None,
    engine: Literal["jax", "ctranslate2"] = "jax",
    device: str = "cpu",
    compute_type: str = "default",
    quantization: str | Sequence[str] = "none",
    kv_cache: str = "float",
) -> Translator:
    """Open a workdir: its model config, tokenizer and the parameters of one checkpoint.

    step=None takes the newest readable checkpoint. Hyperparameters come from the workdir's
    model_config.json, so nothing has to be repeated. mesh_shape defaults to all devices in
    data parallel (parameters replicated); pass e.g. {"data": 1, "fsdp": -1} to shard them.
    engine="ctranslate2" opens a model exported by `python -m transformer_jax.export` instead
    (workdir is then the exported folder; device and compute_type go to CTranslate2).

    Several models decode as one ensemble (the mean of their log-probabilities per step):
    load([dir_a, dir_b]), load(dir, step=[2000, 2500]) (steps of one run), or a list of both,
    one step per workdir. They must share the vocabulary and tokenizer (refused by name).

    quantization="int8" quantizes the parameters in memory for int8 decoding (model/quant.py;
    the checkpoint stays float); a list gives one name per model of an ensemble, and must
    then name one precision for all. kv_cache="int8" stores the decoding cache as int8.
    Both are the JAX engine's: a CTranslate2 export carries its own quantization.
    """
    mesh = sharding.make_mesh(mesh_shape or sharding.DATA_PARALLEL)
    # Each process feeds its own sentences: a 'tensor' group across processes would mix them.
    sharding.check_mesh_feeds_consistent_rows(mesh)
    rules = sharding.rules_from_config(logical_axis_rules)
    members = _members(workdir, step)
    quantizations = (
        [quantization] * len(members) if isinstance(quantization, str) else list(quantization)
    )
    if len(quantizations) != len(members):
        raise ValueError(
            f"--quantization: {len(quantizations)} names for {len(members)} models; give one "
            "name for all"
        )
    for name in quantizations:
        check_names(name, kv_cache)
    if len(set(quantizations)) > 1:
        listed = ", ".join(f"{q} for {w}" for (w, _), q in zip(members, quantizations, strict=True))
        raise ValueError(
            f"--quantization: ensemble members quantized differently ({listed}); an ensemble "
            "decodes every member at one precision, so give one name for all"
        )
    if engine == "ctranslate2":
        if set(quantizations) != {"none"} or kv_cache != "float":
            raise ValueError(
                "quantization and kv_cache are the JAX engine's; with engine='ctranslate2' the "
                "export's own quantization applies (python -m transformer_jax.export "
                "--quantization int8, or compute_type='int8')"
            )
        if len(members) > 1:
            raise ValueError("engine='ctranslate2' decodes one exported model; ensembles: 'jax'")
        folder = os.fspath(members[0][0])
        backend = CTranslate2Engine(folder, device=device, compute_type=compute_type)
        return Translator(
            config=backend.config,
            params=None,
            tokenizer=backend.tokenizer,
            step=int(backend.meta["step"]),
            workdir=epath.Path(folder),
            mesh=mesh,
            rules=rules,
            backend=backend,
        )
    loaded = [
        _load_one(Workdir(w), s, mesh, rules, q, kv_cache)
        for (w, s), q in zip(members, quantizations, strict=True)
    ]
    config, params, tokenizer, first_step = loaded[0]
    if len(loaded) == 1:
        log.info("Loaded %s step %d (%s)", members[0][0], first_step, config)
        return Translator(
            config=config,
            params=params,
            tokenizer=tokenizer,
            step=first_step,
            workdir=Workdir(members[0][0]).path,
            mesh=mesh,
            rules=rules,
        )
    configs = tuple(c for c, _, _, _ in loaded)
    for (w, _), (_, _, other, _) in zip(members[1:], loaded[1:], strict=True):
        _check_same_tokenizer(tokenizer, other, members[0][0], w)
    check_members(configs)
    ensemble = Ensemble(configs)
    named = tuple((os.fspath(w), s) for (w, _), (_, _, _, s) in zip(members, loaded, strict=True))
    log.info("Loaded an ensemble of %d models: %s", len(named), named)
    return Translator(
        config=ensemble.config,
        params={f"members_{i}": p for i, (_, p, _, _) in enumerate(loaded)},
        tokenizer=tokenizer,
        step=first_step,
        workdir=Workdir(members[0][0]).path,
        mesh=mesh,
        rules=rules,
        members=named,
        member_configs=configs,
    )


def _members(
    workdir: epath.PathLike | Sequence[epath.PathLike], step: int | Sequence[int | None] | None
) -> list[tuple[epath.PathLike, int | None]]:
    """(workdir, step) of each model load() was asked for."""
    single = isinstance(workdir, str | os.PathLike)
    workdirs = [workdir] if single else list(workdir)  # type: ignore[list-item]
    if step is None or isinstance(step, int):
        return [(w, step) for w in workdirs]
    steps = list(step)
    if single:
        return [(workdirs[0], s) for s in steps]
    if len(steps) != len(workdirs):
        raise ValueError(
            f"step: {len(steps)} steps for {len(workdirs)} workdirs; give one step per workdir, "
            "or one workdir with several steps"
        )
    return list(zip(workdirs, steps, strict=True))


def _load_one(
    run: Workdir,
    step: int | None,
    mesh: Mesh,
    rules: sharding.LogicalRules,
    quantization: str = "none",
    kv_cache: str = "float",
) -> tuple[ModelConfig, Any, Tokenizer, int]:
    config = run.read_model_config().replace(kv_cache=kv_cache)
    tokenizer = run.load_tokenizer(config.vocab_size)
    try:
        sharding.check_experts_divide(config.moe_num_experts, dict(mesh.shape))
    except ValueError as e:
        raise ValueError(f"load(mesh_shape=...): {run.path}: {e}") from e
    abstract = abstract_train_state(config, mesh, rules).params
    params, found = run.restore_params(step, abstract)
    if quantization == "int8":
        config, params = quantize(config, params, mesh, rules)
        log.info("Quantized %s step %d to int8 for decoding", run.path, found)
    return config, params, tokenizer, found


def _check_same_tokenizer(a: Tokenizer, b: Tokenizer, a_dir: Any, b_dir: Any) -> None:
    """Raise ValueError naming both workdirs unless the two tokenizers have the same pieces."""
    pieces_a = [a.id_to_piece(i) for i in range(a.vocab_size)]
    pieces_b = [b.id_to_piece(i) for i in range(b.vocab_size)]
    if pieces_a == pieces_b and type(a) is type(b):
        return
    if len(pieces_a) != len(pieces_b):
        why = f"{len(pieces_b)} pieces against {len(pieces_a)}"
    elif type(a) is not type(b):
        why = f"a {type(b).__name__} against a {type(a).__name__}"
    else:
        i = next(i for i, (x, y) in enumerate(zip(pieces_a, pieces_b, strict=True)) if x != y)
        why = f"id {i} is {pieces_b[i]!r} against {pieces_a[i]!r}"
    raise ValueError(
        f"{b_dir}: its tokenizer differs from {a_dir}'s ({why}); an ensemble needs models "
        "of one vocabulary"
    )
