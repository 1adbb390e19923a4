"""Experiment configs (configs/*.py): the one place they are checked, and their data splits.

train.py, the AOT compiler and evaluate all call `validate` before anything loads or compiles,
so a config one of them refuses, every one of them refuses, with the same message naming the
field. (translate reads no experiment config: its settings are its flags, checked by
`inference.engine.DecodeSettings`.)
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from etils import epath
from ml_collections import config_dict

from transformer_jax import sharding
from transformer_jax.config import ModelConfig
from transformer_jax.data import pipeline, sources

Pair = tuple[str, str]


def model_section(preset: str, **overrides: Any) -> ml_collections.ConfigDict:
    """A config's `model` section: every ModelConfig field, from a preset (the one source).

    A field that is None (num_kv_heads, attention_window, moe_feed_forward, ...) becomes a typed
    placeholder, so `--config.model.attention_window=16` overrides it from the command line
    (ml_collections cannot infer a type from None and would refuse the flag).
    """
    hints = typing.get_type_hints(ModelConfig)
    values: dict[str, Any] = {}
    for name, value in ModelConfig.preset(preset, **overrides).to_dict().items():
        if value is None:
            kinds = [t for t in typing.get_args(hints[name]) if t is not type(None)]
            # A Literal of names (moe_feed_forward) is a str on the command line.
            kinds = [str if typing.get_origin(t) is typing.Literal else t for t in kinds]
            value = config_dict.placeholder(kinds[0]) if len(kinds) == 1 else None
        values[name] = value
    return ml_collections.ConfigDict(values)


# Fields added after configs were first written: a config file or a workdir's config.json
# without them gets these values (their meaning when the field did not exist).
LATER_FIELDS: dict[str, Any] = {
    "model_from_workdir": False,
    "optim.skip_nonfinite_updates": False,
    "optim.max_nonfinite_in_a_row": 10,
    "data.reshard_on_resume": False,
    "train.average_last": 0,
    "train.average_every": 100,
    "train.keep_best": False,
    "train.early_stopping_patience": 0,
    "decode.beam_size": 1,
    "decode.alpha": 0.6,
}


def fill_later_fields(config: ml_collections.ConfigDict) -> None:
    """Add the LATER_FIELDS a config lacks, in place (older config files and workdirs)."""
    for dotted, value in LATER_FIELDS.items():
        section_name, _, name = dotted.rpartition(".")
        section = _lookup(config, section_name) if section_name else config
        if name not in section:
            with section.unlocked():
                section[name] = value


def adopt_workdir_model(
    config: ml_collections.ConfigDict, model_config_path: epath.Path
) -> ml_collections.ConfigDict:
    """The config, its model section replaced by the workdir's when model_from_workdir is set.

    For fine-tuning a model that came from elsewhere (convert --from-huggingface): the workdir's
    model_config.json is the model, whatever config.model says.
    """
    fill_later_fields(config)
    if not config.model_from_workdir:
        return config
    if not model_config_path.exists():
        raise FileNotFoundError(
            f"{model_config_path}: missing, but config.model_from_workdir=True takes the "
            "model from it; point --workdir at an imported workdir (python -m "
            "transformer_jax.convert --from-huggingface HF_DIR --workdir DIR writes one)"
        )
    adopted = ml_collections.ConfigDict(config.to_dict())
    adopted.model = ml_collections.ConfigDict(ModelConfig.load(model_config_path).to_dict())
    return adopted


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """ModelConfig(**config.model), naming the config section on errors."""
    if config.model is None:
        raise ValueError(
            "config.model is None: give the config a model section, or set "
            "model_from_workdir=True and --workdir an imported workdir (configs/finetune.py)"
        )
    try:
        return ModelConfig.from_dict(config.model.to_dict(), source="config.model")
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.model: {e}") from e


def validate(
    config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> ModelConfig:
    """Check every field a user can get wrong; returns the model config.

    devices: the devices the run will use (a topology's for AOT); the mesh and batch checks
    need them. None skips those (evaluate and translate read a config trained elsewhere).
    """
    fill_later_fields(config)
    model = model_config(config)
    checks = [
        (config.train.num_steps >= 1, "train.num_steps", "must be >= 1"),
        (config.train.log_every >= 1, "train.log_every", "must be >= 1"),
        (config.train.eval_every >= 0, "train.eval_every", "must be >= 0 (0 = only at the end)"),
        (config.train.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0"),
        (config.train.max_to_keep >= 1, "train.max_to_keep", "must be >= 1"),
        (config.optim.warmup_steps >= 1, "optim.warmup_steps", "must be >= 1"),
        (config.optim.grad_accum_steps >= 1, "optim.grad_accum_steps", "must be >= 1"),
        (0 <= config.optim.label_smoothing < 1, "optim.label_smoothing", "must be in [0, 1)"),
        (
            _is_int(config.optim.max_nonfinite_in_a_row, 1),
            "optim.max_nonfinite_in_a_row",
            "must be an integer >= 1",
        ),
        (config.data.tokens_per_batch >= 1, "data.tokens_per_batch", "must be >= 1"),
        (config.data.eval_batch_size >= 1, "data.eval_batch_size", "must be >= 1"),
        (
            config.data.max_source_length <= model.max_len,
            "data.max_source_length",
            f"exceeds model.max_len={model.max_len}",
        ),
        (
            config.data.max_target_length <= model.max_len,
            "data.max_target_length",
            f"exceeds model.max_len={model.max_len}",
        ),
        (
            # An adopted model comes with its workdir's vocabulary (check_vocab checks that one).
            config.model_from_workdir or config.data.tokenizer.vocab_size <= model.vocab_size,
            "data.tokenizer.vocab_size",
            f"exceeds model.vocab_size={model.vocab_size}",
        ),
        (
            model.quantization == "none",
            "model.quantization",
            f"{model.quantization!r} is for decoding a trained model (load(..., quantization=), "
            "translate/evaluate --quantization, aot --mode=decode --quantization); training "
            "and its checkpoints stay float: leave it 'none'",
        ),
        (_is_int(config.decode.max_length, 1), "decode.max_length", "must be an integer >= 1"),
        (_is_int(config.decode.beam_size, 1), "decode.beam_size", "must be an integer >= 1"),
        (config.decode.alpha >= 0, "decode.alpha", "must be >= 0"),
        (_is_int(config.train.average_last, 0), "train.average_last", "must be an integer >= 0"),
        (_is_int(config.train.average_every, 1), "train.average_every", "must be an integer >= 1"),
        (
            config.train.num_steps - (config.train.average_last - 1) * config.train.average_every
            >= 1
            or not config.train.average_last,
            "train.average_last",
            f"{config.train.average_last} checkpoints every {config.train.average_every} steps "
            f"do not fit in train.num_steps={config.train.num_steps}",
        ),
        (
            _is_int(config.train.early_stopping_patience, 0),
            "train.early_stopping_patience",
            "must be an integer >= 0 (0 = off)",
        ),
        (
            not (config.train.early_stopping_patience and config.train.average_last),
            "train.early_stopping_patience",
            "cannot go with train.average_last: an early stop ends the run before the steps "
            "it averages (the last ones); set one of them to 0",
        ),
        (
            not config.train.early_stopping_patience
            or (config.train.keep_best and config.train.eval_every > 0),
            "train.early_stopping_patience",
            "needs train.keep_best=True and train.eval_every > 0 (it counts evaluations "
            "without a new best)",
        ),
        (_is_int(config.decode.extra_length, 0), "decode.extra_length", "must be an integer >= 0"),
    ]
    for ok, field, message in checks:
        if not ok:
            raise ValueError(f"config.{field}: {message} (got {_lookup(config, field)!r})")
    try:
        sharding.check_experts_divide(model.moe_num_experts, dict(config.mesh.shape))
    except ValueError as e:
        raise ValueError(f"config.{e}") from e
    if devices is not None:
        _check_devices(config, model, devices)
    return model


def _check_devices(
    config: ml_collections.ConfigDict, model: ModelConfig, devices: Sequence[jax.Device]
) -> None:
    local = len(devices) // len({d.process_index for d in devices})
    if config.data.eval_batch_size % local:
        raise ValueError(
            f"config.data.eval_batch_size={config.data.eval_batch_size} must be a multiple of "
            f"the {local} devices per process (rows are split across them)"
        )
    sizes = sharding.resolve_mesh_shape(dict(config.mesh.shape), len(devices))
    try:
        sharding.check_experts_divide(model.moe_num_experts, sizes)  # -1 resolved
    except ValueError as e:
        raise ValueError(f"config.{e}") from e
    sharding.rules_from_config(config.mesh.logical_axis_rules)


def average_steps(config: ml_collections.ConfigDict) -> list[int]:
    """The steps whose parameters train.average_last averages: the last N, average_every apart."""
    train = config.train
    if not train.average_last:
        return []
    return sorted(train.num_steps - k * train.average_every for k in range(train.average_last))


def rows_per_host(
    config: ml_collections.ConfigDict, process_count: int, devices_per_process: int
) -> int:
    """Packed rows each host feeds per step for the config's token budget (train.py and aot)."""
    return pipeline.rows_for_token_budget(
        config.data.tokens_per_batch,
        config.data.max_target_length,
        process_count,
        multiple_of=devices_per_process * config.optim.grad_accum_steps,
    )


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _lookup(config: ml_collections.ConfigDict, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = value[part]
    return value


def load_split(config: ml_collections.ConfigDict, split: str) -> Sequence[Pair]:
    """The pairs of one split from the configured source."""
    options = config.data.options.to_dict() if config.data.options else {}
    pairs = sources.load_pairs(config.data.kind, split, **options)
    if len(pairs) == 0:
        raise ValueError(f"config.data: the {config.data.kind!r} source's {split!r} split is empty")
    return pairs
