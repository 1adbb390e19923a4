"""The compiled pieces of one training run, built once for the loop and the AOT compiler alike."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from transformer_jax import sharding
from transformer_jax.config import ModelConfig
from transformer_jax.model import Transformer
from transformer_jax.state import TrainState, abstract_train_state, init_train_state
from transformer_jax.training import optim, step


@dataclasses.dataclass(frozen=True)
class Program:
    """Model, optimizer, the state's layout on the mesh, and the jitted train and eval steps."""

    model_config: ModelConfig
    model: Transformer
    mesh: Mesh
    rules: sharding.LogicalRules
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
    train_step: Any  # (state, global batch, rng) -> (state, metrics); donates the state
    eval_step: Any  # (params, global batch) -> summed losses, replicated
    seed: int

    @property
    def state_shardings(self) -> Any:
        """The sharding of every leaf of the train state."""
        return sharding.shardings_of(self.abstract_state)

    @property
    def rows(self) -> jax.sharding.NamedSharding:
        """Batch rows split over the mesh's data axes."""
        return sharding.batch_sharding(self.mesh)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """The mesh and rules the steps trace under."""
        with sharding.context(self.mesh, self.rules):
            yield

    def init_state(self) -> TrainState:
        """The initial state, built directly into its shardings."""
        return init_train_state(
            self.model_config,
            self.mesh,
            self.rules,
            self.optimizer,
            self.seed,
            self.abstract_state,
        )


def build(config: ml_collections.ConfigDict, model_config: ModelConfig, mesh: Mesh) -> Program:
    """Optimizer, abstract state and jitted steps of a validated config on a mesh (no compute)."""
    rules = sharding.rules_from_config(config.mesh.logical_axis_rules)
    model = Transformer(model_config)
    optimizer, schedule = optim.optimizer_from_config(config.optim, model_config.d_model)
    abstract = abstract_train_state(model_config, mesh, rules, optimizer, config.seed)
    shardings = sharding.shardings_of(abstract)
    train_step = step.jit_train_step(
        model,
        optimizer,
        schedule,
        mesh,
        shardings,
        label_smoothing=config.optim.label_smoothing,
        grad_accum_steps=config.optim.grad_accum_steps,
        skip_nonfinite=config.optim.skip_nonfinite_updates,
    )
    eval_step = step.jit_eval_step(
        model, mesh, shardings.params, label_smoothing=config.optim.label_smoothing
    )
    return Program(
        model_config=model_config,
        model=model,
        mesh=mesh,
        rules=rules,
        optimizer=optimizer,
        schedule=schedule,
        abstract_state=abstract,
        train_step=train_step,
        eval_step=eval_step,
        seed=config.seed,
    )
