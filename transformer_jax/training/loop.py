"""train_and_evaluate: the training job, as small helpers around a plain Python loop."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from tqdm import tqdm

from transformer_jax import evaluation, experiment, sharding
from transformer_jax.data import pipeline
from transformer_jax.inference.engine import DecodeSettings, JaxEngine
from transformer_jax.model import moe
from transformer_jax.state import TrainState
from transformer_jax.training import inputs, loss, metrics
from transformer_jax.training.guard import FiniteGuard, NonFiniteError
from transformer_jax.training.preemption import Preemption
from transformer_jax.training.program import Program, build
from transformer_jax.workdir import (
    Checkpoints,
    Restored,
    Workdir,
    process0_says,
    require_finite,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    """What a run did: last step, why it stopped, and its final figures."""

    step: int
    stopped_by: str  # "finished" | "early_stopped" | "preempted" | "stopped"
    final_metrics: dict[str, float]
    workdir: epath.Path


@dataclasses.dataclass
class _Run:
    """One run's parts, as the loop's helpers share them."""

    config: ml_collections.ConfigDict
    workdir: Workdir
    program: Program
    data: inputs.TrainingData
    engine: JaxEngine
    writer: metrics.MetricWriter
    ckpt: Checkpoints
    final: dict[str, float] = dataclasses.field(default_factory=dict)
    train_iter: Any = None
    counter: inputs.StreamCounter = dataclasses.field(default_factory=inputs.StreamCounter)
    guard: FiniteGuard | None = None
    # train.keep_best: the best validation BLEU so far, and evaluations since it was reached.
    best_bleu: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: epath.PathLike,
    *,
    stop_after: int | None = None,
) -> TrainResult:
    """Train from config into workdir (resuming from its latest checkpoint), then evaluate.

    stop_after: stop (saving a checkpoint) once this step is reached, as an interruption would;
    used to test that resuming reaches exactly the uninterrupted result.
    """
    run = Workdir(workdir)
    config = experiment.adopt_workdir_model(config, run.model_config_path)
    model_config = experiment.validate(config, jax.devices())
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_model_config(model_config)
    run.write_experiment_config(config)
    data = inputs.prepare(config, run, model_config)
    mesh = sharding.make_mesh(dict(config.mesh.shape))
    sharding.check_mesh_feeds_consistent_rows(mesh)
    program = build(config, model_config, mesh)
    ckpt = run.checkpoints(
        save_every=config.train.checkpoint_every,
        max_to_keep=config.train.max_to_keep,
        async_save=config.train.async_checkpointing,
    )
    writer = metrics.MetricWriter(run.tensorboard_dir)
    engine = JaxEngine(model_config, mesh, program.rules)
    parts = _Run(config, run, program, data, engine, writer, ckpt)
    try:
        state, rng = restore_or_init(parts)
        state, step, stopped_by = _train(parts, state, rng, stop_after)
    finally:
        ckpt.close()
    if stopped_by in ("finished", "early_stopped"):
        if stopped_by == "finished":  # an early stop has just evaluated this step
            _validate(parts, state.params, step)
        _test(parts, state.params, step)
    else:
        log.info(
            "Stopped at step %d (%s); checkpoint saved in %s. Run again to resume.",
            step,
            stopped_by,
            ckpt.directory,
        )
    writer.close()
    return TrainResult(step, stopped_by, parts.final, run.path)


def restore_or_init(run: _Run) -> tuple[TrainState, jax.Array]:
    """Continue from the newest readable checkpoint (state, RNG, data stream), else start fresh.

    Sets up run.train_iter, run.counter and run.guard to match.
    """
    program, config = run.program, run.config
    while True:
        resumed = run.ckpt.restore_newest(program.abstract_state)
        # None: no full checkpoint is readable; the newest may hold imported parameters.
        initial = None if resumed is not None else _params_only_start(run)
        start, exact = inputs.resume_start(config, resumed.meta if resumed else None)
        run.train_iter = run.data.train_iterator(start)
        run.counter = inputs.StreamCounter(start)
        if resumed is None or not exact or _restore_stream(run, resumed):
            break
        # Its data iterator state is damaged: that checkpoint cannot resume exactly either.
        run.ckpt.set_aside([resumed.step])
    run.guard = FiniteGuard(
        skip=config.optim.skip_nonfinite_updates,
        max_in_a_row=config.optim.max_nonfinite_in_a_row,
        checkpoint_dir=run.ckpt.directory,
        last_finite_save=(
            resumed.step if resumed else int(initial.step) if initial is not None else None
        ),
        skipped_total=resumed.meta.get("skipped_steps", 0) if resumed else 0,
    )
    # The best as of the checkpoint resumed (best.json may already name a later step, which
    # this run will reach and evaluate again).
    best = resumed.meta.get("best") if resumed else None
    run.best_bleu, run.best_step = (best["bleu"], best["step"]) if best else (None, None)
    run.evals_without_improvement = (
        resumed.meta.get("evals_without_improvement", 0) if resumed else 0
    )
    if resumed is None:
        state = initial if initial is not None else program.init_state()
        return state, jax.random.key(program.seed)
    log.info("Restored step %d from %s", resumed.step, run.ckpt.directory)
    rng = jax.random.key(program.seed) if resumed.rng is None else resumed.rng
    return resumed.state, rng


def _params_only_start(run: _Run) -> TrainState | None:
    """The first state of a run whose newest checkpoint holds parameters alone, else None.

    convert --from-huggingface writes one at step 0: training starts from its parameters with
    a fresh optimizer and the data stream from its beginning. Once the run saves a full
    checkpoint (a later step), resuming reads that one as usual. (average's, at a later step,
    are refused: see below.)
    """
    steps = run.ckpt.steps()
    if not steps or not run.ckpt.params_only(steps[-1]):
        return None
    if steps[-1] != 0:
        # The optimizer's own step count would restart at 0 under a state at this step (the
        # learning rate applied and the one logged would differ): only step 0 starts a run.
        raise ValueError(
            f"{run.ckpt.directory / str(steps[-1])}: holds parameters only (an averaged "
            "workdir?); train.py starts from such a checkpoint only at step 0 (what convert "
            "writes). Train on from the full checkpoints of the run it came from instead."
        )
    abstract = run.program.abstract_state
    params, step = run.workdir.restore_params(steps[-1], abstract.params)
    log.info(
        "Starting from the parameters of checkpoint %d in %s (parameters only: imported or "
        "averaged); the optimizer starts afresh.",
        step,
        run.ckpt.directory,
    )
    return dataclasses.replace(run.program.init_state(), params=params)  # at step 0


def _restore_stream(run: _Run, resumed: Restored) -> bool:
    """Put the pipeline where the checkpoint left it; False if its data item cannot be read."""
    where = run.ckpt.directory / str(resumed.step) / "data"
    if not resumed.has_data:
        log.warning(
            "%s: missing; the training state is restored but the data stream starts from its "
            "beginning.",
            where,
        )
        return True
    try:
        run.ckpt.restore_iterator(resumed.step, run.train_iter)
    except (ValueError, KeyError, FileNotFoundError) as e:
        log.warning("%s: cannot be read (%s); trying the checkpoint before it.", where, e)
        return False
    position = resumed.meta.get("data")
    # Older checkpoints did not count the examples trained on; the kept ones are close.
    run.counter.emitted = (
        position["emitted"][jax.process_index()]
        if position
        else pipeline.filter_counts(run.train_iter)["kept"]
    )
    return True


def _train(
    run: _Run, state: TrainState, rng: jax.Array, stop_after: int | None
) -> tuple[TrainState, int, str]:
    """Steps until num_steps, a signal or stop_after; logs, evaluates and saves on the way."""
    config, program, guard = run.config, run.program, run.guard
    assert guard is not None
    train = config.train
    start = int(jax.device_get(state.step))
    _log_start(run, state, start)
    bar = _progress_bar(train.num_steps, start)
    pending: list[dict[str, jax.Array]] = []
    interval_start = time.perf_counter()
    step, stopped_by = start, "early_stopped" if _patience_exhausted(run) else "finished"
    with Preemption() as preemption, contextlib.closing(bar):
        while step < train.num_steps and stopped_by == "finished":
            host_batch = next(run.train_iter)
            run.counter.count(host_batch)
            batch = sharding.to_global(host_batch, program.rows)
            with program.context():
                state, step_metrics = program.train_step(state, batch, rng)
            step += 1
            guard.add(step, step_metrics["finite"])
            pending.append(step_metrics)
            bar.update(1)
            if step % train.log_every == 0 or step == train.num_steps:
                _log_interval(run, bar, step, pending, interval_start)
                pending, interval_start = [], time.perf_counter()
            if train.eval_every and step % train.eval_every == 0 and step < train.num_steps:
                guard.check(step)  # never spend an evaluation on a poisoned state
                _validate(run, state.params, step)
                interval_start = time.perf_counter()
            _keep_for_average(run, step, state.params)
            if run.ckpt.due(step):
                _save(run, step, state, rng)
            preempted = preemption.should_stop(step)
            if preempted or (stop_after is not None and step >= stop_after):
                stopped_by = "preempted" if preempted else "stopped"
            elif _patience_exhausted(run):
                stopped_by = "early_stopped"
    if not run.ckpt.has(step):
        _save(run, step, state, rng)
    run.ckpt.wait()
    return state, step, stopped_by


def _save(run: _Run, step: int, state: TrainState, rng: jax.Array) -> None:
    """Save a checkpoint, only once every step so far is known to have been finite."""
    assert run.guard is not None
    run.guard.check(step)  # raises NonFiniteError instead of saving a poisoned state
    # The flags cover loss, gradients and update; this covers the sum params + update too.
    try:
        require_finite(state, "its parameters or optimizer state")
    except ValueError as e:
        raise NonFiniteError(f"step {step}: {e}; it is not saved.") from e
    position = run.counter.position(run.train_iter)
    meta = {
        "data": position.to_json(),
        "skipped_steps": run.guard.skipped_total,
        "evals_without_improvement": run.evals_without_improvement,
        "best": None if run.best_step is None else {"bleu": run.best_bleu, "step": run.best_step},
    }
    run.ckpt.save(step, state, run.train_iter, rng, meta)
    run.guard.saved(step)


def _keep_for_average(run: _Run, step: int, params: Any) -> None:
    """Save this step's parameters if train.average_last averages them (and they are finite)."""
    if step not in experiment.average_steps(run.config):
        return
    store = run.workdir.average_checkpoints
    if not process0_says(step not in store.steps()):  # kept before this run resumed
        return
    assert run.guard is not None
    run.guard.check(step)
    try:
        require_finite(params, "its parameters")
    except ValueError as e:
        raise NonFiniteError(f"step {step}: {e}; they are not kept for averaging.") from e
    store.save(step, params)


def _patience_exhausted(run: _Run) -> bool:
    """Whether train.early_stopping_patience evaluations have passed without a new best."""
    patience = run.config.train.early_stopping_patience
    if not patience or run.evals_without_improvement < patience:
        return False
    log.info(
        "Early stop: %d evaluations without a validation BLEU above %.2f (best in %s).",
        run.evals_without_improvement,
        run.best_bleu or 0.0,
        run.workdir.best,
    )
    return True


def _keep_best(run: _Run, params: Any, step: int, scores: dict[str, Any]) -> None:
    """train.keep_best: make step the best checkpoint if its validation BLEU beats the best."""
    if not run.config.train.keep_best or step == run.best_step:  # the best itself, again
        return
    if run.best_bleu is not None and scores["bleu"] <= run.best_bleu:
        run.evals_without_improvement += 1
        return
    run.best_bleu, run.best_step, run.evals_without_improvement = scores["bleu"], step, 0
    record = {"bleu": scores["bleu"], "signature": scores["signature"]}
    run.workdir.best.write_best(step, params, record, run.workdir)
    log.info(
        "step %d: best validation BLEU so far (%.2f), kept in %s",
        step,
        scores["bleu"],
        run.workdir.best,
    )


def _log_start(run: _Run, state: TrainState, start: int) -> None:
    config = run.config
    total = sum(x.size for x in jax.tree.leaves(state.params))
    active = moe.active_parameters(run.program.model_config, state.params)
    log.info(
        "Model: %s parameters%s; mesh %s; %d rows x (%d src + %d tgt) per step; %s",
        f"{total:,}",
        f" ({active:,} active per token)" if active != total else "",
        dict(run.program.mesh.shape),
        run.data.rows_per_host * jax.process_count(),
        config.data.max_source_length,
        config.data.max_target_length,
        f"resuming at step {start}" if start else "starting at step 0",
    )


def _progress_bar(total: int, initial: int) -> Any:
    return tqdm(
        total=total,
        initial=initial,
        desc="train",
        unit="step",
        file=sys.stderr,
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
        # Redraw rarely when stderr is a file (CI, nohup), so logs stay readable.
        mininterval=0.1 if sys.stderr.isatty() else 30.0,
    )


def _log_interval(
    run: _Run, bar: Any, step: int, pending: list[dict[str, jax.Array]], interval_start: float
) -> None:
    """Read back one interval's metrics: stop on NaN (unless skipped), else log and plot them."""
    config, guard = run.config, run.guard
    assert guard is not None
    guard.check(step)  # waits for the interval's last step
    # Timed after the read-back: with dispatch running ahead, the steps finish only now.
    elapsed = time.perf_counter() - interval_start
    rows = run.data.rows_per_host * jax.process_count()
    values = metrics.interval_summary(
        pending,
        elapsed,
        metrics.train_flops(
            run.program.model_config,
            rows,
            config.data.max_source_length,
            config.data.max_target_length,
        ),
        jax.device_count(),
        metrics.peak_tflops(jax.devices()[0].device_kind),
    )
    if config.optim.skip_nonfinite_updates:
        values["skipped_total"] = float(guard.skipped_total)
    else:
        values.pop("skipped_steps", None)
    run.writer.scalars(step, {f"train/{k}": v for k, v in values.items()})
    bar.set_postfix(
        loss=f"{values['loss']:.3f}",
        lr=f"{values['learning_rate']:.2e}",
        tok_s=f"{values['tokens_per_sec']:.0f}",
    )
    log.info("step %d: %s", step, metrics.format_values(values))
    run.final.update({f"train_{k}": v for k, v in values.items()})


def _greedy(run: _Run, params: Any) -> evaluation.DecodeRows:
    """The loop's decoder: greedy, under the config's output caps (fast, not the paper's beam)."""
    return run.engine.bind(params, _settings(run.config, greedy=True))


def _settings(config: ml_collections.ConfigDict, *, greedy: bool) -> DecodeSettings:
    """Greedy, or the config's decoding (decode.beam_size 1 is greedy too), with its caps."""
    beam = config.decode.beam_size
    return DecodeSettings(
        method="greedy" if greedy or beam == 1 else "beam",
        beam_size=1 if greedy else beam,
        alpha=config.decode.alpha,
        extra_length=config.decode.extra_length,
        max_length=config.decode.max_length,
    )


def _validate(run: _Run, params: Any, step: int) -> None:
    """Validation loss over the whole split and greedy sacreBLEU on its first sentences."""
    config, program = run.config, run.program
    start = time.perf_counter()
    with program.context():
        sums = evaluation.loss_sums(program.eval_step, params, run.data.valid_batches, program.rows)
    # Summarized in float32 on the device, as the training metrics are.
    summary = loss.summarize({k: jnp.asarray(v) for k, v in sums.items()})
    values = {k: float(v) for k, v in summary.items()}
    subset = list(run.data.valid_pairs[: config.train.eval_bleu_sentences or None])
    hypotheses = evaluation.translate(
        _greedy(run, params),
        run.data.tokenizer,
        [source for source, _ in subset],
        batch_size=config.data.eval_batch_size,
        max_source_length=config.data.max_source_length,
    )
    scores = evaluation.score(hypotheses, [target for _, target in subset])
    values["bleu"] = scores["bleu"]
    run.writer.scalars(step, {f"validation/{k}": v for k, v in values.items()})
    run.writer.text(step, "validation/bleu_signature", scores["signature"])
    log.info(
        "step %d validation: loss=%.4f nll=%.4f ppl=%.3f BLEU=%.2f on %d sentences (%s) [%.1fs]",
        step,
        values["loss"],
        values["nll"],
        values["perplexity"],
        values["bleu"],
        len(subset),
        scores["signature"],
        time.perf_counter() - start,
    )
    run.final.update({f"validation_{k}": v for k, v in values.items()})
    _keep_best(run, params, step, scores)


def _test(run: _Run, params: Any, step: int) -> None:
    """Score the test split: greedy, the config's decoding, the average and the best; results.json.

    Every row names its checkpoint steps, decoding settings and sacreBLEU / chrF signatures;
    test.hyp.txt holds the greedy translations of the last step, as before rows existed.
    """
    config = run.config
    split = config.data.test_split
    if not split:
        return
    pairs = list(experiment.load_split(config, split))
    greedy = _settings(config, greedy=True)
    wanted = _settings(config, greedy=False)
    first, hypotheses = _test_row(run, pairs, "last", [step], params, greedy, split)
    rows = [first]
    if wanted != greedy:
        rows.append(_test_row(run, pairs, "last", [step], params, wanted, f"{split}.beam")[0])
    averaged = _averaged(run)
    if averaged is not None:
        name = f"averaged_last{len(averaged[0])}"
        rows.append(_test_row(run, pairs, name, *averaged, wanted, f"{split}.{name}")[0])
    best = _best(run)
    if best is not None:
        rows.append(_test_row(run, pairs, "best", *best, wanted, f"{split}.best")[0])
    run.workdir.write_results(
        {
            # The greedy score of the last step, as results.json held before it had rows.
            "step": step,
            "split": split,
            "bleu": first["bleu"],
            "signature": first["signature"],
            "num_sentences": first["num_sentences"],
            "rows": rows,
        }
    )
    samples = "\n".join(
        f"  src: {src}\n  ref: {ref}\n  hyp: {hyp}"
        for (src, ref), hyp in list(zip(pairs, hypotheses, strict=True))[: config.train.num_samples]
    )
    log.info("Sample translations (%s split):\n%s", split, samples)
    run.writer.text(step, "test/samples", samples)
    run.final["test_bleu"] = first["bleu"]
    for row in rows[1:]:
        run.final[f"test_bleu_{row['name']}_{row['decoding']['method']}"] = row["bleu"]


def _test_row(
    run: _Run,
    pairs: list[tuple[str, str]],
    name: str,
    steps: list[int],
    params: Any,
    settings: DecodeSettings,
    hypotheses_name: str,
) -> tuple[dict[str, Any], list[str]]:
    """Decode the test sources with one set of parameters; write them; (row, hypotheses)."""
    config = run.config
    hypotheses = evaluation.translate(
        run.engine.bind(params, settings),
        run.data.tokenizer,
        [source for source, _ in pairs],
        batch_size=config.data.eval_batch_size,
        max_source_length=config.data.max_source_length,
        progress=True,
    )
    scores = evaluation.score(hypotheses, [target for _, target in pairs])
    path = run.workdir.hypotheses_path(hypotheses_name)
    evaluation.write_hypotheses(path, hypotheses)
    decoding = {
        k: getattr(settings, k)
        for k in ("method", "beam_size", "alpha", "extra_length", "max_length")
    }
    if settings.method == "greedy":
        decoding.pop("alpha")
    label = f"{name} step{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))}"
    how = settings.method + (
        f" {settings.beam_size}, alpha {settings.alpha}" if settings.method == "beam" else ""
    )
    log.info(
        "Test (%s, %d sentences; %s; %s): sacreBLEU %.2f chrF %.2f  %s",
        config.data.test_split,
        len(hypotheses),
        label,
        how,
        scores["bleu"],
        scores["chrf"],
        scores["signature"],
    )
    last_greedy = (name, settings.method) == ("last", "greedy")  # "test/bleu" as it always was
    key = "test/bleu" if last_greedy else f"test/bleu_{name}_{settings.method}"
    run.writer.scalars(steps[-1], {key: scores["bleu"]})
    row = {
        "name": name,
        "steps": steps,
        "decoding": decoding,
        "bleu": scores["bleu"],
        "chrf": scores["chrf"],
        "signature": scores["signature"],
        "chrf_signature": scores["chrf_signature"],
        "num_sentences": len(hypotheses),
        "hypotheses": path.name,
    }
    return row, hypotheses


def _averaged(run: _Run) -> tuple[list[int], Any] | None:
    """(steps, mean parameters) of train.average_last, written as WORKDIR/averaged_last<N>/."""
    wanted = experiment.average_steps(run.config)
    if not wanted:
        return None
    store = run.workdir.average_checkpoints
    missing = sorted(set(wanted) - set(store.steps()))
    if missing:
        log.warning(
            "Not averaging: steps %s of %s were never reached or saved in %s (an early stop "
            "ends the run before them).",
            missing,
            wanted,
            store.directory,
        )
        return None
    mean = store.mean(wanted, run.program.abstract_state.params)
    output = Workdir(run.workdir.averaged_dir(len(wanted)))
    if jax.process_index() == 0:
        run.workdir.copy_metadata_to(output)
        output.write_averaged_from(run.workdir, wanted)
    # A rerun of a finished run (or one preempted while decoding) has written it already.
    if process0_says(max(wanted) not in output.steps()):
        output.save_params(max(wanted), mean)
    return wanted, mean


def _best(run: _Run) -> tuple[list[int], Any] | None:
    """([step], parameters) of the best checkpoint by validation BLEU (train.keep_best)."""
    best = run.workdir.best
    record = best.read_best() if run.config.train.keep_best else None
    if record is None:
        return None
    params, step = best.restore_params(int(record["step"]), run.program.abstract_state.params)
    return [step], params


def new_workdir(root: str = "runs") -> Path:
    """A fresh runs/<timestamp> folder for a run started without --workdir."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(root) / stamp
    suffix = 1
    while path.exists():
        path = Path(root) / f"{stamp}-{suffix}"
        suffix += 1
    return path
