"""The train state and the one function that gives its shapes and shardings.

Training (the loop, the AOT compiler) builds the whole state; inference (the translator,
checkpoint averaging) asks for the same function without an optimizer and reads the
parameters alone, so a checkpoint restores into exactly the layout it was trained in.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from transformer_jax import sharding
from transformer_jax.config import ModelConfig
from transformer_jax.model import Transformer

Array = jax.Array

# Shapes of the dummy batch that init traces; parameters do not depend on them.
_INIT_SHAPE = (1, 8)


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: the update count, parameters and optimizer state."""

    step: Array
    params: Any
    opt_state: Any


def init_state(
    model: Transformer,
    optimizer: optax.GradientTransformation | None,
    rng: Array,
    src_shape: tuple[int, int] = _INIT_SHAPE,
    tgt_shape: tuple[int, int] = _INIT_SHAPE,
) -> TrainState:
    """Fresh state with logically-boxed leaves (for sharding specs); nn.unbox it before use.

    Without an optimizer opt_state is None: the parameters-only state of inference.
    """
    variables = model.init(rng, jnp.ones(src_shape, jnp.int32), jnp.ones(tgt_shape, jnp.int32))
    params = variables["params"]
    # Adam's moments inherit the parameters' logical boxes, so they shard the same way.
    opt_state = None if optimizer is None else optimizer.init(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)


def abstract_train_state(
    config: ModelConfig,
    mesh: Mesh,
    rules: sharding.LogicalRules,
    optimizer: optax.GradientTransformation | None = None,
    seed: int = 0,
) -> TrainState:
    """ShapeDtypeStructs with their mesh shardings for every leaf of the state; no compute."""
    model = Transformer(config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return sharding.abstract_with_shardings(
            lambda: init_state(model, optimizer, jax.random.key(seed)), mesh, rules
        )


def init_train_state(
    config: ModelConfig,
    mesh: Mesh,
    rules: sharding.LogicalRules,
    optimizer: optax.GradientTransformation,
    seed: int,
    abstract: TrainState | None = None,
) -> TrainState:
    """The initial state, built directly into the shardings of abstract_train_state (or given)."""
    model = Transformer(config)
    if abstract is None:
        abstract = abstract_train_state(config, mesh, rules, optimizer, seed)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return sharding.init_sharded(
            lambda: init_state(model, optimizer, jax.random.key(seed)),
            sharding.shardings_of(abstract),
        )
