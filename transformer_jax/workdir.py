"""A run folder (workdir): the only place its file names and its checkpoint manager live.

    model_config.json   the frozen ModelConfig (a checkpoint is meaningless without it)
    config.json         the experiment config the run was started with
    tokenizer.model     the shared sentencepiece model (+ tokenizer.vocab beside it)
    checkpoints/<step>/ orbax: state (TrainState or params only), data (grain iterator, one
                        file per process), meta (RNG key, process count)
    tensorboard/        event files
    results.json        the final test scores; <split>[.step<N>].hyp.txt the hypotheses

Workdirs may be local folders or URLs (gs://bucket/run): every path goes through etils.epath,
and orbax writes the arrays with tensorstore's own drivers.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from transformer_jax.config import ModelConfig
from transformer_jax.data.tokenizer import Tokenizer, check_vocab, load_or_train_tokenizer

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


def workdir_path(workdir: PathLike) -> epath.Path:
    """The workdir as an epath.Path: URLs (gs://...) kept whole, local paths made absolute.

    pathlib would turn gs://bucket/run into ./gs:/bucket/run, a local folder on each host, so
    a pod would silently keep one checkpoint directory per host.
    """
    text = os.fspath(workdir)
    if "://" in text:
        return epath.Path(text)
    # orbax wants absolute paths, and they name the same place after a chdir.
    return epath.Path(os.path.abspath(text))


class Workdir:
    """One run's folder: its metadata files, tokenizer, checkpoints and outputs."""

    MODEL_CONFIG = "model_config.json"
    EXPERIMENT_CONFIG = "config.json"
    TOKENIZER = "tokenizer.model"
    TOKENIZER_VOCAB = "tokenizer.vocab"
    CHECKPOINTS = "checkpoints"
    TENSORBOARD = "tensorboard"
    RESULTS = "results.json"
    AVERAGED_FROM = "averaged_from.txt"
    # What makes a copy of this workdir's model usable elsewhere (average writes new workdirs).
    METADATA = (MODEL_CONFIG, EXPERIMENT_CONFIG, TOKENIZER, TOKENIZER_VOCAB)

    def __init__(self, path: PathLike | Workdir) -> None:
        self.path: epath.Path = path.path if isinstance(path, Workdir) else workdir_path(path)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"Workdir({str(self.path)!r})"

    @property
    def checkpoint_dir(self) -> epath.Path:
        """Where orbax keeps one folder per saved step."""
        return self.path / self.CHECKPOINTS

    @property
    def tensorboard_dir(self) -> epath.Path:
        """TensorBoard event files."""
        return self.path / self.TENSORBOARD

    @property
    def tokenizer_path(self) -> epath.Path:
        """The sentencepiece model file."""
        return self.path / self.TOKENIZER

    @property
    def model_config_path(self) -> epath.Path:
        """The stored ModelConfig."""
        return self.path / self.MODEL_CONFIG

    def averaged_dir(self, last: int) -> epath.Path:
        """Where `average --last N` writes its workdir by default."""
        return self.path / f"averaged_last{last}"

    def write_averaged_from(self, source: Workdir, steps: Iterable[int]) -> None:
        """Record which workdir and steps an averaged workdir came from."""
        text = f"{source} steps {', '.join(map(str, steps))}\n"
        (self.path / self.AVERAGED_FROM).write_text(text)

    def hypotheses_path(self, name: str, step: int | None = None) -> epath.Path:
        """<name>.hyp.txt, or <name>.step<N>.hyp.txt for one checkpoint's decoding."""
        return self.path / (f"{name}.hyp.txt" if step is None else f"{name}.step{step}.hyp.txt")

    # -- metadata -------------------------------------------------------------------------------

    def require(self) -> None:
        """Raise FileNotFoundError unless this folder holds a trained model's metadata."""
        if not self.model_config_path.exists():
            raise FileNotFoundError(
                f"{self.path}: no {self.MODEL_CONFIG}; not a transformer-jax workdir "
                "(python train.py --workdir=DIR creates one)"
            )

    def read_model_config(self) -> ModelConfig:
        """The workdir's ModelConfig (FileNotFoundError when it is not a workdir)."""
        self.require()
        return ModelConfig.load(self.model_config_path)

    def write_model_config(self, config: ModelConfig) -> None:
        """Store the model config, or check it equals the one already there."""
        path = self.model_config_path
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

    def read_experiment_config(self) -> ml_collections.ConfigDict | None:
        """The experiment config the run was started with, or None if it was not recorded."""
        path = self.path / self.EXPERIMENT_CONFIG
        if not path.exists():
            return None
        try:
            return ml_collections.ConfigDict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: not valid JSON ({e}); the experiment config is corrupt"
            ) from e

    def experiment_config_or_raise(self, why: str) -> ml_collections.ConfigDict:
        """read_experiment_config, or FileNotFoundError saying what needed it."""
        config = self.read_experiment_config()
        if config is None:
            raise FileNotFoundError(f"{self.path / self.EXPERIMENT_CONFIG}: missing, so {why}")
        return config

    def write_experiment_config(self, config: ml_collections.ConfigDict) -> None:
        """Record the run's experiment config (process 0 writes)."""
        if jax.process_index() == 0:
            text = config.to_json_best_effort(indent=2) + "\n"
            (self.path / self.EXPERIMENT_CONFIG).write_text(text)

    def write_results(self, results: dict[str, Any]) -> None:
        """results.json (process 0 writes)."""
        if jax.process_index() == 0:
            (self.path / self.RESULTS).write_text(json.dumps(results, indent=2) + "\n")

    def load_tokenizer(self, model_vocab_size: int | None = None) -> Tokenizer:
        """The workdir's tokenizer, checked against the model's vocabulary when given."""
        tokenizer = Tokenizer.load(self.tokenizer_path)
        if model_vocab_size is not None:
            check_vocab(tokenizer, model_vocab_size, str(self.path))
        return tokenizer

    def load_or_train_tokenizer(
        self, sentences_fn: Callable[[], Iterable[str]], vocab_size: int, **train_kwargs: Any
    ) -> Tokenizer:
        """The workdir's tokenizer, trained on sentences_fn() first if it has none."""
        return load_or_train_tokenizer(
            self.tokenizer_path, sentences_fn, vocab_size, **train_kwargs
        )

    def copy_metadata_to(self, other: Workdir) -> None:
        """Copy the files that describe the model (not the checkpoints) into another workdir."""
        other.path.mkdir(parents=True, exist_ok=True)
        for name in self.METADATA:
            if (self.path / name).exists():
                (self.path / name).copy(other.path / name, overwrite=True)

    # -- checkpoints ----------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Steps with a finished checkpoint, oldest first."""
        if not self.checkpoint_dir.is_dir():
            return []
        # orbax's own notion of "finalized" (a step folder renamed into place once complete).
        return sorted(ocp.utils.checkpoint_steps(self.checkpoint_dir))

    def checkpoints(
        self, *, save_every: int, max_to_keep: int, async_save: bool = True
    ) -> Checkpoints:
        """The training-state checkpoint manager (saves every save_every steps)."""
        return Checkpoints(
            self.checkpoint_dir,
            save_every=save_every,
            max_to_keep=max_to_keep,
            async_save=async_save,
        )

    def restore_params(self, step: int | None, abstract_params: Any) -> tuple[Any, int]:
        """Only the parameters of one checkpoint (default: the newest), into abstract's shardings.

        Reads params alone (partial restore), so the optimizer's moments never reach memory.
        """
        directory = self.checkpoint_dir
        steps = self.steps()
        if not steps:
            raise FileNotFoundError(
                f"{directory}: no checkpoints; train first "
                f"(python train.py --workdir={self.path}) or point at a workdir that has them"
            )
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise ValueError(f"{self.path}: no checkpoint for step {step}; saved steps are {steps}")
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
                f"{self.MODEL_CONFIG} ({e}); the checkpoint and the model config disagree"
            ) from e
        finally:
            manager.close()
        return restored["state"]["params"], step

    def save_params(self, step: int, params: Any) -> None:
        """Write a params-only checkpoint (averaged weights) that load() and evaluate read."""
        manager = ocp.CheckpointManager(
            self.checkpoint_dir,
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


class _IteratorSnapshot:
    """A frozen copy of an iterator's state, so an async save cannot see later batches."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = json.dumps(state, indent=1).encode()

    def get_state(self) -> bytes:
        return self._state


class Checkpoints:
    """Saves {state, data iterator, meta} every N steps (async) and restores them."""

    def __init__(
        self, directory: epath.Path, *, save_every: int, max_to_keep: int, async_save: bool = True
    ) -> None:
        self.directory = directory
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
                "meta": ocp.JsonCheckpointHandler(),
                # Read-only: the key item of checkpoints written before "meta" existed.
                "rng": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self.manager.latest_step()

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
        meta: dict[str, Any] = {"process_count": jax.process_count()}
        if rng is not None:
            meta["key_data"] = np.asarray(jax.random.key_data(rng)).tolist()
        args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator.get_state()))
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)
        return True

    def items(self, step: int) -> set[str]:
        """The items a saved step holds, as orbax recorded them (state, data, meta, ...)."""
        return set(self.manager.item_metadata(step).keys())

    def restore(
        self, step: int, abstract_state: Any, iterator: Any
    ) -> tuple[Any, jax.Array | None]:
        """(state in the shardings of abstract_state, saved RNG key); the iterator in place."""
        items = self.items(step)
        meta = self._meta(step, items)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        if iterator is not None:
            self._restore_iterator(step, items, meta.get("process_count"), iterator)
        rng = None
        if "key_data" in meta:
            key_data = np.asarray(meta["key_data"], np.uint32)
            rng = jax.random.wrap_key_data(jnp.asarray(key_data))
        return restored["state"], rng

    def _meta(self, step: int, items: set[str]) -> dict[str, Any]:
        # Checkpoints from before the meta item hold the key alone, as "rng".
        name = "meta" if "meta" in items else "rng" if "rng" in items else None
        if name is None:
            return {}
        restored = self.manager.restore(
            step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()})
        )
        return dict(restored[name])

    def _restore_iterator(
        self, step: int, items: set[str], saved_by: int | None, iterator: Any
    ) -> None:
        where = self.directory / str(step)
        if "data" not in items:
            reason = "it holds no data iterator state"
        elif saved_by is not None and saved_by != jax.process_count():
            # grain keeps one iterator state per process: it applies to the same process count.
            reason = (
                f"its data iterator state was saved by {saved_by} process(es), this run has "
                f"{jax.process_count()}"
            )
        else:
            args = ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(iterator))
            self.manager.restore(step, args=args)
            return
        log.warning(
            "%s: %s; the training state is restored but the data pipeline starts from its "
            "beginning.",
            where,
            reason,
        )

    def wait(self) -> None:
        """Block until async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
