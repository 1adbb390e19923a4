"""Which ModelConfig settings an exporter can write: one allow-list check for every format.

Each exporter names, per ModelConfig field, the rule its format can express; a field it does
not name is refused. So a switch added to ModelConfig later is refused by every exporter until
someone maps it, instead of being exported as if it were not there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from transformer_jax.config import ModelConfig

# Fields that change training or compute only, never the function the weights compute.
TRAINING_ONLY = frozenset(
    {
        "dropout_rate",
        "attention_dropout_rate",
        "relu_dropout_rate",
        "dtype",
        "param_dtype",
        "attention_impl",
        "splash_block_size",
        "remat",
        "moe_capacity_factor",
        "moe_eval_capacity_factor",
        "moe_load_balance_loss",
        "moe_router_z_loss",
        "moe_dispatch",
        # The decoding cache's storage: the exported weights compute the same function, and
        # the other tool keeps its own cache.
        "kv_cache",
    }
)

# Mixture-of-experts knobs read only when moe_num_experts > 0, which every exporter refuses
# through moe_num_experts itself (neither format has an encoder-decoder MoE); dense models
# export whatever these hold. The training-only ones (capacity, loss coefficients, dispatch)
# are in TRAINING_ONLY as well.
MOE_KNOBS = (
    "moe_experts_per_token",
    "moe_encoder_every",
    "moe_decoder_every",
    "moe_d_ff",
    "moe_feed_forward",
)

# A field's rule: (does the format express this config's value, why not when it does not).
Rule = tuple[Callable[[ModelConfig], bool], str]


def any_value() -> Rule:
    """The rule of a field the format expresses at every value (sizes, ids)."""
    return (lambda config: True), ""


def one_of(field: str, values: set[object], tool: str) -> Rule:
    """The rule of a field whose value must be one of `values`."""
    return (lambda config: getattr(config, field) in values), f"{tool} takes {_listed(values)}"


def dense_ffn(tool: str) -> Rule:
    """The rule of moe_num_experts: the format has a dense FFN only."""
    return (lambda config: config.moe_num_experts == 0), (
        f"{tool} has no mixture-of-experts layers in an encoder-decoder; moe_num_experts must be 0"
    )


def float_weights(tool: str) -> Rule:
    """The rule of quantization: exports start from float weights (the tool quantizes its own)."""
    return (lambda config: config.quantization == "none"), (
        f"export the float workdir; {tool} applies its own quantization"
    )


def unsupported(config: ModelConfig, rules: Mapping[str, Rule], tool: str) -> list[str]:
    """'field=value (why)' for every setting of config that `rules` does not allow."""
    found = []
    for field in dataclasses.fields(config):
        if field.name in TRAINING_ONLY:
            continue
        value = getattr(config, field.name)
        rule = rules.get(field.name)
        if rule is None:
            found.append(f"{field.name}={value!r} (no {tool} mapping for this switch)")
        elif not rule[0](config):
            found.append(f"{field.name}={value!r} ({rule[1]})")
    return found


def _listed(values: set[object]) -> list[str]:
    return sorted(map(str, values))
