"""A run folder (workdir): the only place its file names and its checkpoint manager live.

    model_config.json   the frozen ModelConfig (a checkpoint is meaningless without it)
    config.json         the experiment config the run was started with
    tokenizer.model     the shared sentencepiece model (+ tokenizer.vocab beside it), or, for a
                        model imported from Marian: source.spm, target.spm and vocab.json
    checkpoints/<step>/ orbax: state (TrainState or params only), data (grain iterator, one
                        file per process), meta (RNG key, process count)
    tensorboard/        event files
    results.json        the final test scores; <split>[.step<N>].hyp.txt the hypotheses

Workdirs may be local folders or URLs (gs://bucket/run): every path goes through etils.epath,
and orbax writes the arrays with tensorstore's own drivers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from transformer_jax.config import ModelConfig
from transformer_jax.data.tokenizer import (
    Tokenizer,
    VocabTokenizer,
    check_vocab,
    load_or_train_tokenizer,
)

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


def _finalized_steps(directory: epath.Path) -> list[int]:
    """The steps of a checkpoint folder whose save finished, oldest first."""
    if not directory.is_dir():
        return []
    # orbax's own notion of "finalized" (a step folder renamed into place once complete).
    return sorted(ocp.utils.checkpoint_steps(directory))


class Workdir:
    """One run's folder: its metadata files, tokenizer, checkpoints and outputs."""

    MODEL_CONFIG = "model_config.json"
    EXPERIMENT_CONFIG = "config.json"
    TOKENIZER = "tokenizer.model"
    TOKENIZER_VOCAB = "tokenizer.vocab"
    # A Marian vocabulary (python -m transformer_jax.convert --from-huggingface writes these).
    SOURCE_SPM = "source.spm"
    TARGET_SPM = "target.spm"
    VOCAB = "vocab.json"
    CHECKPOINTS = "checkpoints"
    # Parameters kept for train.average_last (apart from the rolling checkpoints).
    AVERAGE_CHECKPOINTS = "checkpoints_average"
    # The best checkpoint by validation BLEU (train.keep_best): a workdir of its own.
    BEST = "best"
    BEST_RECORD = "best.json"
    TENSORBOARD = "tensorboard"
    RESULTS = "results.json"
    AVERAGED_FROM = "averaged_from.txt"
    IMPORTED_FROM = "imported_from.txt"
    # What makes a copy of this workdir's model usable elsewhere (average writes new workdirs).
    METADATA = (
        MODEL_CONFIG,
        EXPERIMENT_CONFIG,
        TOKENIZER,
        TOKENIZER_VOCAB,
        SOURCE_SPM,
        TARGET_SPM,
        VOCAB,
    )

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

    @property
    def average_checkpoints(self) -> ParamsCheckpoints:
        """The parameters train.average_last keeps for the end-of-run average."""
        return ParamsCheckpoints(self.path / self.AVERAGE_CHECKPOINTS)

    @property
    def best(self) -> Workdir:
        """The workdir holding the best checkpoint by validation BLEU (train.keep_best)."""
        return Workdir(self.path / self.BEST)

    def read_best(self) -> dict[str, Any] | None:
        """This (best) workdir's record {step, bleu, signature}, or None if there is none yet."""
        path = self.path / self.BEST_RECORD
        if not path.exists():
            return None
        try:
            return dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); delete it to start afresh") from e

    def write_best(self, step: int, params: Any, record: dict[str, Any], source: Workdir) -> None:
        """Make this the best workdir: source's metadata, these params at step, the record.

        Every process calls it (the save is collective); process 0 writes the files.
        """
        if jax.process_index() == 0:
            source.copy_metadata_to(self)
        store = ParamsCheckpoints(self.checkpoint_dir)
        # Saved, then recorded, then the older best deleted: a kill in between leaves a record
        # that names a step on disk. A step saved before (a resumed run reaching it again, with
        # the same parameters) is not saved twice.
        if process0_says(step not in store.steps()):
            store.save(step, params)
        if jax.process_index() == 0:
            tmp = self.path / f"{self.BEST_RECORD}.tmp"
            tmp.write_text(json.dumps({"step": step, **record}, indent=2) + "\n")
            tmp.replace(self.path / self.BEST_RECORD)
            for old in store.steps():
                if old != step:
                    (self.checkpoint_dir / str(old)).rmtree()

    def averaged_dir(self, last: int) -> epath.Path:
        """Where `average --last N` writes its workdir by default."""
        return self.path / f"averaged_last{last}"

    def write_averaged_from(self, source: Workdir, steps: Iterable[int]) -> None:
        """Record which workdir and steps an averaged workdir came from."""
        text = f"{source} steps {', '.join(map(str, steps))}\n"
        (self.path / self.AVERAGED_FROM).write_text(text)

    def write_imported_from(self, text: str) -> None:
        """Record where an imported model came from and how its ids were renumbered."""
        (self.path / self.IMPORTED_FROM).write_text(text.rstrip("\n") + "\n")

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

    @property
    def has_marian_vocabulary(self) -> bool:
        """Whether the tokenizer is an imported Marian vocabulary (vocab.json + two models)."""
        return (self.path / self.VOCAB).exists()

    def load_tokenizer(self, model_vocab_size: int | None = None) -> Tokenizer:
        """The workdir's tokenizer, checked against the model's vocabulary when given."""
        if self.has_marian_vocabulary:
            tokenizer: Tokenizer = VocabTokenizer.load_files(
                self.path / self.SOURCE_SPM, self.path / self.TARGET_SPM, self.path / self.VOCAB
            )
        else:
            tokenizer = Tokenizer.load(self.tokenizer_path)
        if model_vocab_size is not None:
            check_vocab(tokenizer, model_vocab_size, str(self.path))
        return tokenizer

    def load_or_train_tokenizer(
        self, sentences_fn: Callable[[], Iterable[str]], vocab_size: int, **train_kwargs: Any
    ) -> Tokenizer:
        """The workdir's tokenizer, trained on sentences_fn() first if it has none."""
        if self.has_marian_vocabulary:
            log.info("Using the imported vocabulary %s (not training one).", self.path / self.VOCAB)
            return self.load_tokenizer()
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
        return _finalized_steps(self.checkpoint_dir)

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
        """Only the parameters of one checkpoint, into abstract's shardings; (params, step).

        Reads params alone (partial restore), so the optimizer's moments never reach memory.
        step=None takes the newest readable checkpoint: one that fails to read or holds
        NaN/inf is named in a warning and the one before it is tried (nothing is deleted).
        A given step that cannot be read is an error naming it.
        """
        steps = self.steps()
        if not steps:
            raise FileNotFoundError(
                f"{self.checkpoint_dir}: no checkpoints; train first "
                f"(python train.py --workdir={self.path}) or point at a workdir that has them"
            )
        if step is not None and step not in steps:
            raise ValueError(f"{self.path}: no checkpoint for step {step}; saved steps are {steps}")
        return restore_params_in(
            self.checkpoint_dir, [step] if step is not None else steps[::-1], abstract_params
        )

    def save_params(self, step: int, params: Any) -> None:
        """Write a params-only checkpoint (averaged weights) that load() and evaluate read."""
        ParamsCheckpoints(self.checkpoint_dir).save(step, params)


class ParamsCheckpoints:
    """Parameters-only checkpoints in one folder, saved synchronously (max_to_keep: rotate)."""

    def __init__(self, directory: epath.Path, max_to_keep: int | None = None) -> None:
        self.directory = directory
        self.max_to_keep = max_to_keep

    def steps(self) -> list[int]:
        """Finished steps, oldest first."""
        return _finalized_steps(self.directory)

    def save(self, step: int, params: Any) -> None:
        """Write {"params": params} as the `state` item of step (what load() reads)."""
        options = ocp.CheckpointManagerOptions(
            create=True, enable_async_checkpointing=False, max_to_keep=self.max_to_keep
        )
        manager = ocp.CheckpointManager(
            self.directory,
            options=options,
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

    def restore(self, step: int, abstract_params: Any) -> Any:
        """One step's parameters, in abstract_params' shardings."""
        return restore_params_in(self.directory, [step], abstract_params)[0]

    def mean(self, steps: Sequence[int], abstract_params: Any) -> Any:
        """The mean of these steps' parameters, accumulated in float64 on the host."""
        return mean_params((self.restore(s, abstract_params) for s in steps), abstract_params)


def mean_params(trees: Iterable[Any], abstract_params: Any) -> Any:
    """The element-wise mean of parameter trees, one tree in memory at a time; None if none.

    Where this process holds every shard, sums are float64 on the host (the mean does not
    depend on the order); parameters sharded across processes (FSDP on a pod) are summed in
    float32 on their devices. The mean is placed in abstract_params' shardings.
    """
    total: Any = None
    count = 0
    for tree in trees:
        local = all(x.is_fully_addressable for x in jax.tree.leaves(tree))
        part = jax.tree.map(
            (lambda x: np.asarray(x, np.float64)) if local else (lambda x: x.astype(jnp.float32)),
            tree,
        )
        total = part if total is None else jax.tree.map(lambda a, b: a + b, total, part)
        count += 1
        del tree, part
    if total is None:
        return None

    def place(x: Any, a: Any) -> jax.Array:
        mean = (x / count).astype(a.dtype)
        return jax.device_put(mean, a.sharding) if getattr(a, "sharding", None) else mean

    return jax.tree.map(place, total, abstract_params)


def process0_says(flag: bool) -> bool:
    """Process 0's value of flag on every process (a file listing may lag on other hosts)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def restore_params_in(
    directory: epath.Path, candidates: Sequence[int], abstract_params: Any
) -> tuple[Any, int]:
    """The parameters of the first readable, finite step of candidates; (params, step)."""
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(create=False),
        item_handlers={"state": ocp.PyTreeCheckpointHandler()},
    )
    target = {"params": abstract_params}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)

    def read(s: int) -> Any:
        item = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        return manager.restore(s, args=ocp.args.Composite(state=item))["state"]["params"]

    try:
        found, params = newest_readable(
            directory,
            candidates,
            read,
            check=lambda params: require_finite(params, "its parameters"),
        )
    finally:
        manager.close()
    return params, found


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

    def steps(self) -> list[int]:
        """Finished steps on disk, oldest first (has() also counts a save still in flight)."""
        return _finalized_steps(self.directory)

    def due(self, step: int) -> bool:
        """Whether step is a periodic save step (a multiple of save_every) not yet saved."""
        return self.save_every > 0 and step % self.save_every == 0 and not self.has(step)

    def has(self, step: int) -> bool:
        """Whether a checkpoint of this step exists."""
        return step in self.manager.all_steps()

    def save(
        self,
        step: int,
        state: Any,
        iterator: Any,
        rng: jax.Array | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Save state, the iterator's state and meta (RNG key, process count, extra fields)."""
        record: dict[str, Any] = {"process_count": jax.process_count(), **(meta or {})}
        if rng is not None:
            record["key_data"] = np.asarray(jax.random.key_data(rng)).tolist()
        args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(record)}
        if iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator.get_state()))
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def params_only(self, step: int) -> bool:
        """Whether a step holds parameters alone (written by convert or average), no train state.

        A step whose metadata cannot be read counts as a full one: reading it then fails, and
        the fallback of restore_newest names it.
        """
        try:
            if self.items(step) != {"state"}:
                return False
            return set(self.manager.item_metadata(step)["state"].keys()) == {"params"}
        except DAMAGE_ERRORS:
            return False

    def items(self, step: int) -> set[str]:
        """The items a saved step holds, as orbax recorded them (state, data, meta, ...)."""
        return set(self.manager.item_metadata(step).keys())

    def restore_state(self, step: int, abstract_state: Any) -> Restored:
        """One step's state in the shardings of abstract_state, and its meta record."""
        items = self.items(step)
        meta = self.meta(step, items)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        rng = None
        if "key_data" in meta:
            key_data = np.asarray(meta["key_data"], np.uint32)
            rng = jax.random.wrap_key_data(jnp.asarray(key_data))
        return Restored(step, restored["state"], rng, meta, has_data="data" in items)

    def restore_newest(self, abstract_state: Any) -> Restored | None:
        """The newest checkpoint that reads back whole and finite; None if there is none.

        A damaged or non-finite newer one is named in a warning and moved aside to
        <workdir>/damaged_checkpoints/ (never deleted), so this run can save that step again.
        """
        steps = self.steps()
        # A parameters-only step (an import) ends the search: older ones are never reached,
        # and if every newer one is unreadable the run starts from it again (None).
        floor = max((s for s in steps if self.params_only(s)), default=-1)
        full = [s for s in steps if s > floor]
        if not full:
            return None
        try:
            found, restored = newest_readable(
                self.directory,
                full[::-1],
                lambda step: self.restore_state(step, abstract_state),
                check=lambda r: require_finite(r.state, "its training state"),
            )
        except UnreadableCheckpointError:
            if floor < 0:
                raise
            self.set_aside(full)
            return None
        self.set_aside([s for s in steps if s > found])
        return restored

    def restore_iterator(self, step: int, iterator: Any) -> None:
        """Put the iterator where it was when step was saved (same dataset, same processes)."""
        args = ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(iterator))
        self.manager.restore(step, args=args)

    def meta(self, step: int, items: set[str] | None = None) -> dict[str, Any]:
        """A step's meta record: RNG key, process count, stream position, skipped steps."""
        items = self.items(step) if items is None else items
        # Checkpoints from before the meta item hold the key alone, as "rng".
        name = "meta" if "meta" in items else "rng" if "rng" in items else None
        if name is None:
            return {}
        restored = self.manager.restore(
            step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()})
        )
        return dict(restored[name])

    def set_aside(self, steps: list[int]) -> None:
        """Move these steps' folders to <workdir>/damaged_checkpoints/ (all processes call it)."""
        if not steps:
            return
        aside = self.directory.parent / DAMAGED_CHECKPOINTS
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            for step in steps:
                target = aside / str(step)
                suffix = 1
                while target.exists():
                    target = aside / f"{step}.{suffix}"
                    suffix += 1
                (self.directory / str(step)).rename(target)
                log.warning("Moved the unreadable checkpoint %d to %s (not deleted).", step, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("transformer_jax:set_aside")
        self.manager.reload()

    def wait(self) -> None:
        """Block until async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


DAMAGED_CHECKPOINTS = "damaged_checkpoints"


@dataclasses.dataclass
class Restored:
    """A checkpoint read back: its step, state, RNG key and meta record."""

    step: int
    state: Any
    rng: jax.Array | None
    meta: dict[str, Any]
    has_data: bool  # whether it holds a data iterator state


class UnreadableCheckpointError(ValueError):
    """No checkpoint of a workdir could be read; the message names each one and why."""


def require_finite(tree: Any, what: str) -> None:
    """Raise ValueError if any floating-point leaf of tree holds NaN or inf."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    if leaves and not bool(_all_finite(leaves)):
        raise ValueError(f"{what} hold NaN/inf values")


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


T = TypeVar("T")


def newest_readable(
    directory: epath.Path,
    steps: Sequence[int],
    read: Callable[[int], T],
    check: Callable[[T], None] | None = None,
) -> tuple[int, T]:
    """read() the first step that works, newest first, warning about each one that does not.

    check(result) runs once every process has read the step (it may be a collective).
    """
    reasons = []
    for step in steps:
        error: BaseException | None = None
        try:
            result = read(step)
        except DAMAGE_ERRORS as e:  # orbax, tensorstore and json raise these for bad files
            error = e
        # On several processes each reads only its own shards, so one may fail alone: all
        # agree to treat the step as unreadable, or they would resume from different steps.
        failed = _any_process(error is not None)
        if not failed and check is not None:
            try:
                check(result)
            except DAMAGE_ERRORS as e:  # the check's answer is the same on every process
                error, failed = e, True
        if failed:
            reason = first_line(error) if error else "unreadable on another process"
            reasons.append(f"step {step}: {reason}")
            if len(steps) > 1:
                log.warning(
                    "%s: cannot be read, it is damaged, incomplete or not this model's (%s); "
                    "trying the checkpoint before it.",
                    directory / str(step),
                    reason,
                )
            continue
        return step, result
    if len(steps) == 1:
        raise UnreadableCheckpointError(
            f"{directory / str(steps[0])}: cannot be read ({reasons[0].partition(': ')[2]}); "
            "pick another step, or copy this one again from where it came from."
        )
    raise UnreadableCheckpointError(
        f"{directory}: no readable checkpoint ({'; '.join(reasons)}). Copy intact checkpoints "
        f"back, check that {Workdir.MODEL_CONFIG} is the one they were trained with, or move the "
        "folder away to start afresh."
    )


# What a damaged, truncated, partly copied or foreign checkpoint raises when read: JSON errors
# (ValueError), tensorstore's DATA_LOSS / NOT_FOUND (ValueError), a missing item (KeyError,
# FileNotFoundError), our NaN check (ValueError). Anything else (an OSError of the storage, out
# of memory, a bug) is raised as it is: falling back to an older step would hide it.
DAMAGE_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, FileNotFoundError)


def _any_process(flag: bool) -> bool:
    """Whether flag is true on any process (every process must call this together)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an error's message (its type name if it has none), at most limit long."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:limit]
