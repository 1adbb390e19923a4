"""Orbax checkpoints of the training state and the grain iterator, with the workdir's metadata."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from transformer_jax.config import ModelConfig

log = logging.getLogger(__name__)

MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_FILE = "tokenizer.model"
CHECKPOINT_DIR = "checkpoints"


def workdir_path(workdir: str | os.PathLike[str]) -> epath.Path:
    """The workdir as an epath.Path: URLs (gs://...) kept whole, local paths made absolute.

    pathlib would turn gs://bucket/run into ./gs:/bucket/run, a local folder on each host, so
    a pod would silently keep one checkpoint directory per host.
    """
    text = os.fspath(workdir)
    if "://" in text:
        return epath.Path(text)
    # orbax wants absolute paths, and they name the same place after a chdir.
    return epath.Path(os.path.abspath(text))


class _IteratorSnapshot:
    """A frozen copy of an iterator's state, so an async save cannot see later batches."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = json.dumps(state, indent=1).encode()

    def get_state(self) -> bytes:
        return self._state


class Checkpointer:
    """Saves {state, data iterator} every N steps (async) and restores the latest."""

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        save_every: int,
        max_to_keep: int,
        async_save: bool = True,
    ) -> None:
        self.directory = workdir_path(workdir) / CHECKPOINT_DIR
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "rng": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every saved step, oldest first."""
        return sorted(self.manager.all_steps())

    def maybe_save(
        self,
        step: int,
        state: Any,
        iterator: Any,
        rng: jax.Array | None = None,
        *,
        force: bool = False,
    ) -> bool:
        """Save when step is a multiple of save_every (or forced); returns whether it saved."""
        if not force and (self.save_every <= 0 or step % self.save_every):
            return False
        if step in self.manager.all_steps():
            return False
        args = {"state": ocp.args.StandardSave(state)}
        if iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator.get_state()))
        if rng is not None:
            key_data = np.asarray(jax.random.key_data(rng)).tolist()
            args["rng"] = ocp.args.JsonSave({"key_data": key_data})
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)
        return True

    def restore(
        self, step: int, abstract_state: Any, iterator: Any
    ) -> tuple[Any, jax.Array | None]:
        """(state in the shardings of abstract_state, saved RNG key); the iterator in place."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        # grain keeps one file per process, named for the process count that saved it.
        data_file = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if iterator is not None and (self.directory / str(step) / "data" / data_file).exists():
            args["data"] = grain.checkpoint.CheckpointRestore(iterator)
        elif iterator is not None:
            log.warning(
                "%s: no data iterator state for %s (saved with another number of processes); "
                "the training state is restored but the data pipeline starts from its beginning.",
                self.directory / str(step) / "data",
                data_file,
            )
        # Checkpoints written without a key (restore_params users, older runs) still restore.
        has_rng = (self.directory / str(step) / "rng").exists()
        if has_rng:
            args["rng"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        rng = None
        if has_rng:
            key_data = np.asarray(restored["rng"]["key_data"], np.uint32)
            rng = jax.random.wrap_key_data(jnp.asarray(key_data))
        return restored["state"], rng

    def wait(self) -> None:
        """Block until async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def write_model_config(workdir: str | os.PathLike[str], config: ModelConfig) -> None:
    """Store the model config, or check it equals the one already there."""
    path = workdir_path(workdir) / MODEL_CONFIG_FILE
    if path.exists():
        stored = ModelConfig.load(path)
        if stored != config:
            changed = {
                k: (v, getattr(config, k))
                for k, v in stored.to_dict().items()
                if getattr(config, k) != v
            }
            raise ValueError(
                f"{path}: this workdir holds a different model ({changed} as stored vs "
                "requested). Use a new --workdir, or the config this workdir was trained with."
            )
        return
    if jax.process_index() == 0:
        tmp = path.with_suffix(".tmp")
        config.save(tmp)
        tmp.replace(path)


def checkpoint_steps(workdir: str | os.PathLike[str]) -> list[int]:
    """Steps with a finished checkpoint in workdir/checkpoints, oldest first."""
    directory = workdir_path(workdir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    return sorted(
        int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "state").is_dir()
    )


def restore_params(
    workdir: str | os.PathLike[str], step: int | None, abstract_params: Any
) -> tuple[Any, int]:
    """Only the parameters of one checkpoint (default: the newest), into abstract's shardings.

    Reads params alone (partial restore), so the optimizer's moments never reach memory.
    """
    directory = workdir_path(workdir) / CHECKPOINT_DIR
    steps = checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(
            f"{directory}: no checkpoints; train first "
            f"(python train.py --workdir={workdir}) or point at a workdir that has them"
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"{workdir}: no checkpoint for step {step}; saved steps are {steps}")
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(create=False),
        item_handlers={"state": ocp.PyTreeCheckpointHandler()},
    )
    target = {"params": abstract_params}
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True,
                )
            ),
        )
    except (ValueError, KeyError) as e:
        raise ValueError(
            f"{directory / str(step)}: its parameters do not fit "
            f"{MODEL_CONFIG_FILE} ({e}); the checkpoint and the model config disagree"
        ) from e
    finally:
        manager.close()
    return restored["state"]["params"], step


def save_params(workdir: str | os.PathLike[str], step: int, params: Any) -> None:
    """Write a params-only checkpoint (averaged weights) that load() and evaluate read."""
    manager = ocp.CheckpointManager(
        workdir_path(workdir) / CHECKPOINT_DIR,
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
        item_handlers={"state": ocp.StandardCheckpointHandler()},
    )
    try:
        manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})),
            force=True,
        )
        manager.wait_until_finished()
    finally:
        manager.close()
