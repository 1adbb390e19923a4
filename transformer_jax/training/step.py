"""Training and evaluation steps: pure train_step(state, batch, rng) -> (state, metrics), and
the one place they are jitted with their shardings."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from transformer_jax import sharding
from transformer_jax.config import PAD_ID
from transformer_jax.model import Transformer
from transformer_jax.model.layers import AUX_LOSS, COUNTS, REPORTED, reported_sums
from transformer_jax.state import TrainState
from transformer_jax.training.loss import loss_sums

Array = jax.Array
Batch = dict[str, Array]
Metrics = dict[str, Array]

# Metric name prefixes of what layers report (model/layers.py REPORTED): each auxiliary loss
# (already weighted; the step's mean over micro-batches) and each count (summed).
AUX_LOSS_PREFIX = "aux_loss/"
COUNT_PREFIX = "counts/"


def model_inputs(batch: Batch) -> dict[str, Any]:
    """The model's keyword arguments from a pipeline batch (packed keys are optional).

    The one place the pipeline's key names (data.pipeline.BATCH_KEYS) meet the model's.
    """
    return {
        "src_ids_BxS": batch["inputs"],
        "tgt_ids_BxT": batch["targets"],
        "src_segment_ids_BxS": batch.get("inputs_segment_ids"),
        "tgt_segment_ids_BxT": batch.get("targets_segment_ids"),
        "src_positions_BxS": batch.get("inputs_positions"),
        "tgt_positions_BxT": batch.get("targets_positions"),
    }


def forward(
    model: Transformer,
    params: Any,
    batch: Batch,
    *,
    deterministic: bool,
    rngs: dict[str, Array] | None = None,
) -> Array:
    """Teacher-forced float32 logits for a pipeline batch."""
    logits = model.apply(
        {"params": params}, **model_inputs(batch), deterministic=deterministic, rngs=rngs
    )  # type: ignore[arg-type]
    return cast(Array, logits)


def forward_reporting(
    model: Transformer, params: Any, batch: Batch, rng: Array
) -> tuple[Array, Metrics]:
    """Training-mode logits and what the layers reported, as prefixed metric names."""
    logits, reported = model.apply(
        {"params": params},
        **model_inputs(batch),
        deterministic=False,
        rngs={"dropout": rng},
        mutable=list(REPORTED),
    )  # type: ignore[misc]
    found = {
        **{AUX_LOSS_PREFIX + k: v for k, v in reported_sums(reported.get(AUX_LOSS, {})).items()},
        **{COUNT_PREFIX + k: v for k, v in reported_sums(reported.get(COUNTS, {})).items()},
    }
    return cast(Array, logits), found


def make_train_step(
    model: Transformer,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    label_smoothing: float,
    grad_accum_steps: int = 1,
    skip_nonfinite: bool = False,
) -> Callable[[TrainState, Batch, Array], tuple[TrainState, Metrics]]:
    """Build the pure train step; the global batch is split into grad_accum_steps micro-batches.

    Gradients of summed token losses, scaled by 1 / (real target tokens in the whole batch),
    are accumulated over micro-batches, so k micro-steps give exactly the update of one
    k-times-larger batch (optax.MultiSteps averages per-micro-batch means, which differs when
    token counts differ).

    metrics["finite"] says, on the device, whether the loss, the gradients and the update were
    all finite (a finite gradient can still give a NaN update: Adam with eps 0 divides 0 by 0).
    With skip_nonfinite such a step leaves parameters and optimizer state as they were (the
    step count still advances, so the data and dropout keys move on), as fairseq skips them.

    Auxiliary losses the layers report (a mixture of experts' balancing losses) are added to
    the loss as they come, averaged over micro-batches, and returned as "aux_loss/NAME"
    metrics; counts they report are summed into "counts/NAME".
    """
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")

    def loss_fn(params: Any, batch: Batch, rng: Array, scale: Array) -> tuple[Array, Metrics]:
        logits, reported = forward_reporting(model, params, batch, rng)
        sums = loss_sums(logits, batch["targets"], label_smoothing)
        aux = [v for k, v in reported.items() if k.startswith(AUX_LOSS_PREFIX)]
        # Each micro-batch's auxiliary losses are means already: 1 / k of each gives the mean.
        total = sums["loss_sum"] * scale + sum(aux, jnp.zeros(())) / grad_accum_steps
        return total, {**sums, **reported}

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: Batch, rng: Array) -> tuple[TrainState, Metrics]:
        step_rng = jax.random.fold_in(rng, state.step)
        # The token count of the whole batch is known before any gradient; scaling the loss by
        # its inverse gives per-token-mean gradients directly, without a pass over the grads.
        num_tokens = jnp.sum(batch["targets"] != PAD_ID).astype(jnp.float32)
        scale = 1.0 / jnp.maximum(num_tokens, 1.0)
        if grad_accum_steps == 1:
            grads, sums = grad_fn(state.params, batch, step_rng, scale)
        else:
            k = grad_accum_steps
            # Row j of micro-batch i is global row j*k + i: every device keeps a share of every
            # micro-batch, so no rows move between devices.
            micro = jax.tree.map(lambda x: x.reshape(-1, k, *x.shape[1:]).swapaxes(0, 1), batch)

            def accumulate(
                carry: tuple[Any, Metrics], xs: tuple[Batch, Array]
            ) -> tuple[tuple[Any, Metrics], None]:
                micro_batch, i = xs
                g, s = grad_fn(state.params, micro_batch, jax.random.fold_in(step_rng, i), scale)
                return jax.tree.map(jnp.add, carry, (g, s)), None

            first = jax.tree.map(lambda x: x[0], micro)
            # The metrics' names and shapes (whatever the layers report) from a shape-only trace.
            shapes = jax.eval_shape(grad_fn, state.params, first, step_rng, scale)
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), shapes)
            (grads, sums), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(k)))
            sums = {
                name: value / k if name.startswith(AUX_LOSS_PREFIX) else value
                for name, value in sums.items()
            }
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = (
            jnp.isfinite(sums["loss_sum"])
            & jnp.isfinite(grad_norm)
            & jnp.isfinite(optax.tree.norm(updates))
        )
        if skip_nonfinite:
            params, opt_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old),
                (params, opt_state),
                (state.params, state.opt_state),
            )
        metrics = {
            **sums,
            "grad_norm": grad_norm,
            "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
            "finite": finite,
        }
        new_state = dataclasses.replace(
            state, step=state.step + 1, params=params, opt_state=opt_state
        )
        return new_state, metrics

    return train_step


def make_eval_step(
    model: Transformer, *, label_smoothing: float
) -> Callable[[Any, Batch], Metrics]:
    """Build the pure evaluation step: summed losses with dropout off."""

    def eval_step(params: Any, batch: Batch) -> Metrics:
        logits = forward(model, params, batch, deterministic=True)
        return loss_sums(logits, batch["targets"], label_smoothing)

    return eval_step


def jit_train_step(
    model: Transformer,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    state_shardings: Any,
    *,
    label_smoothing: float,
    grad_accum_steps: int = 1,
    skip_nonfinite: bool = False,
) -> Any:
    """The train step jitted once with the state's shardings, batch rows split, state donated.

    Call it inside sharding.context(mesh, rules): the logical constraints read the rules.
    """
    return jax.jit(
        make_train_step(
            model,
            optimizer,
            schedule,
            label_smoothing=label_smoothing,
            grad_accum_steps=grad_accum_steps,
            skip_nonfinite=skip_nonfinite,
        ),
        in_shardings=(state_shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def jit_eval_step(
    model: Transformer, mesh: Mesh, param_shardings: Any, *, label_smoothing: float
) -> Any:
    """The evaluation step jitted with the parameters' shardings; replicated sums out."""
    return jax.jit(
        make_eval_step(model, label_smoothing=label_smoothing),
        in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )
