"""train_and_evaluate: the training job, as small helpers around a plain Python loop."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import sacrebleu
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from transformer_jax.config import ModelConfig
from transformer_jax.data import pipeline, sources
from transformer_jax.data.tokenizer import Tokenizer, check_vocab, load_or_train_tokenizer
from transformer_jax.inference.decode import greedy_decode
from transformer_jax.model import Transformer
from transformer_jax.training import checkpoint, loss, metrics, optim, sharding
from transformer_jax.training.step import TrainState, init_state, make_eval_step, make_train_step

log = logging.getLogger(__name__)

Pair = tuple[str, str]


@dataclasses.dataclass
class TrainResult:
    """What a run did: last step, why it stopped, and its final figures."""

    step: int
    stopped_by: str  # "finished" | "preempted"
    final_metrics: dict[str, float]
    workdir: epath.Path


class _Preemption:
    """SIGTERM (TPU VM maintenance/preemption) sets a flag; the loop saves and exits cleanly.

    On several hosts the flag is only acted on at steps where all processes compare theirs
    (every `sync_every` steps): a host leaving the loop alone would hang the others' collectives.
    """

    def __init__(self, sync_every: int = 10) -> None:
        self.requested = False
        self.sync_every = sync_every
        self._previous: Any = None

    def __enter__(self) -> _Preemption:
        def handler(signum: int, frame: Any) -> None:
            del frame
            log.warning("Signal %d received: saving at the next step boundary.", signum)
            self.requested = True

        self._previous = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after `step`; every process gets the same answer."""
        if jax.process_count() == 1:
            return self.requested
        if step % self.sync_every:
            return False
        # One small host allgather every sync_every steps: any host's signal stops them all.
        flags = multihost_utils.process_allgather(np.asarray(self.requested))
        self.requested = bool(np.any(flags))
        return self.requested


def model_config_from(config: ml_collections.ConfigDict) -> ModelConfig:
    """ModelConfig(**config.model), naming the config section on errors."""
    try:
        return ModelConfig.from_dict(config.model.to_dict(), source="config.model")
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.model: {e}") from e


def validate_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """Check every field a user can get wrong before anything loads or compiles."""
    model_config = model_config_from(config)
    checks = [
        (config.train.num_steps >= 1, "train.num_steps", "must be >= 1"),
        (config.train.log_every >= 1, "train.log_every", "must be >= 1"),
        (config.train.eval_every >= 0, "train.eval_every", "must be >= 0 (0 = only at the end)"),
        (config.train.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0"),
        (config.train.max_to_keep >= 1, "train.max_to_keep", "must be >= 1"),
        (config.optim.warmup_steps >= 1, "optim.warmup_steps", "must be >= 1"),
        (config.optim.grad_accum_steps >= 1, "optim.grad_accum_steps", "must be >= 1"),
        (0 <= config.optim.label_smoothing < 1, "optim.label_smoothing", "must be in [0, 1)"),
        (config.data.tokens_per_batch >= 1, "data.tokens_per_batch", "must be >= 1"),
        (config.data.eval_batch_size >= 1, "data.eval_batch_size", "must be >= 1"),
        (
            config.data.max_source_length <= model_config.max_len,
            "data.max_source_length",
            f"exceeds model.max_len={model_config.max_len}",
        ),
        (
            config.data.max_target_length <= model_config.max_len,
            "data.max_target_length",
            f"exceeds model.max_len={model_config.max_len}",
        ),
        (
            config.data.tokenizer.vocab_size <= model_config.vocab_size,
            "data.tokenizer.vocab_size",
            f"exceeds model.vocab_size={model_config.vocab_size}",
        ),
    ]
    for ok, field, message in checks:
        if not ok:
            raise ValueError(f"config.{field}: {message} (got {_lookup(config, field)!r})")
    if config.data.eval_batch_size % jax.local_device_count():
        raise ValueError(
            f"config.data.eval_batch_size={config.data.eval_batch_size} must be a multiple of "
            f"the {jax.local_device_count()} local devices (rows are split across them)"
        )
    sharding.resolve_mesh_shape(dict(config.mesh.shape), jax.device_count())
    sharding.rules_from_config(config.mesh.logical_axis_rules)
    return model_config


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


def prepare_tokenizer(
    config: ml_collections.ConfigDict,
    workdir: epath.Path,
    train_pairs: Sequence[Pair],
    model_config: ModelConfig,
) -> Tokenizer:
    """Load <workdir>/tokenizer.model or train it on both sides of the training pairs."""
    tok = config.data.tokenizer

    def sentences() -> Iterator[str]:
        for source_text, target_text in train_pairs:
            yield source_text
            yield target_text

    def load_or_train() -> Tokenizer:
        return load_or_train_tokenizer(
            workdir,
            sentences,
            tok.vocab_size,
            model_type=tok.model_type,
            max_sentences=tok.max_sentences,
        )

    if jax.process_count() > 1:
        # Hosts sharing a workdir would race to rename tokenizer.model into place (the loser
        # fails): process 0 trains it, the others wait, then load it (or train their own if
        # the workdir is not shared).
        if jax.process_index() == 0:
            load_or_train()
        multihost_utils.sync_global_devices("transformer_jax:tokenizer")
    tokenizer = load_or_train()
    check_vocab(tokenizer, model_config.vocab_size, str(workdir))
    return tokenizer


@dataclasses.dataclass
class Setup:
    """Compiled pieces of one run, shared by the loop and evaluation."""

    model: Transformer
    model_config: ModelConfig
    mesh: Mesh
    rules: sharding.LogicalRules
    state_shardings: Any
    batch_sharding: NamedSharding
    train_step: Any
    eval_step: Any
    decode_fn: Any
    schedule: Any


def build(config: ml_collections.ConfigDict, model_config: ModelConfig) -> tuple[Setup, Any]:
    """Mesh, sharded initial state and the jitted steps."""
    mesh = sharding.make_mesh(dict(config.mesh.shape))
    sharding.check_mesh_feeds_consistent_rows(mesh)
    rules = sharding.rules_from_config(config.mesh.logical_axis_rules)
    model = Transformer(model_config)
    optimizer, schedule = optim.optimizer_from_config(config.optim, model_config.d_model)
    shape = (1, 8)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, state_shardings = sharding.sharded_init(
            lambda: init_state(model, optimizer, jax.random.key(config.seed), shape, shape),
            mesh,
            rules,
        )
    data_sharding = sharding.batch_sharding(mesh)
    replicated = sharding.replicated(mesh)
    train_step = jax.jit(
        make_train_step(
            model,
            optimizer,
            schedule,
            label_smoothing=config.optim.label_smoothing,
            grad_accum_steps=config.optim.grad_accum_steps,
        ),
        in_shardings=(state_shardings, data_sharding, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(
        make_eval_step(model, label_smoothing=config.optim.label_smoothing),
        in_shardings=(state_shardings.params, data_sharding),
        out_shardings=replicated,
    )
    decode_fn = jax.jit(
        lambda params, src: greedy_decode(
            model,
            params,
            src,
            max_length=config.decode.max_length,
            extra_length=config.decode.extra_length,
        ),
        in_shardings=(state_shardings.params, data_sharding),
        out_shardings=data_sharding,
    )
    setup = Setup(
        model=model,
        model_config=model_config,
        mesh=mesh,
        rules=rules,
        state_shardings=state_shardings,
        batch_sharding=data_sharding,
        train_step=train_step,
        eval_step=eval_step,
        decode_fn=decode_fn,
        schedule=schedule,
    )
    return setup, state


def to_global(batch: dict[str, np.ndarray], sharding_: NamedSharding) -> dict[str, jax.Array]:
    """Host-local numpy rows -> one global array per key (multi-host aware)."""
    return {
        key: jax.make_array_from_process_local_data(sharding_, value)
        for key, value in batch.items()
        if key not in ("mask", "index")
    }


def evaluate_loss(setup: Setup, params: Any, batches: pipeline.EvalBatches) -> dict[str, float]:
    """Validation loss, NLL and perplexity over every example."""
    totals = {"loss_sum": 0.0, "nll_sum": 0.0, "num_tokens": 0.0}
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        for batch in batches:
            sums = setup.eval_step(params, to_global(batch, setup.batch_sharding))
            for key, value in jax.device_get(sums).items():
                totals[key] += float(value)
    summary = loss.summarize({k: jnp.asarray(v) for k, v in totals.items()})
    return {k: float(v) for k, v in summary.items()}


def translate_batches(
    setup: Setup,
    params: Any,
    batches: pipeline.EvalBatches,
    tokenizer: Tokenizer,
    progress: bool = False,
) -> list[str]:
    """Greedy translations of every example in `batches`, in input order."""
    hypotheses: dict[int, str] = {}
    iterator = tqdm(batches, desc="decoding", leave=False, disable=not progress, file=sys.stderr)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        for batch in iterator:
            src = jax.make_array_from_process_local_data(setup.batch_sharding, batch["inputs"])
            out = setup.decode_fn(params, src)
            # Every host decodes its rows; gather them all so BLEU sees the whole split.
            tokens = np.asarray(multihost_utils.process_allgather(out, tiled=True))
            index = np.asarray(
                multihost_utils.process_allgather(
                    jax.make_array_from_process_local_data(setup.batch_sharding, batch["index"]),
                    tiled=True,
                )
            )
            for row, i in enumerate(index):
                if i >= 0:
                    hypotheses[int(i)] = tokenizer.decode(tokens[row])
    return [hypotheses[i] for i in sorted(hypotheses)]


def bleu_score(hypotheses: list[str], references: list[str]) -> tuple[float, str]:
    """Corpus sacreBLEU (detokenized, cased, 13a) and its signature."""
    bleu = sacrebleu.metrics.BLEU()
    score = bleu.corpus_score(hypotheses, [references])
    return score.score, str(bleu.get_signature())


def evaluate_bleu(
    setup: Setup,
    params: Any,
    pairs: Sequence[Pair],
    tokenizer: Tokenizer,
    config: ml_collections.ConfigDict,
    limit: int | None,
    progress: bool = False,
) -> tuple[float, str, list[str], list[Pair]]:
    """Decode the first `limit` pairs (all if None) and score them."""
    subset = list(pairs[: limit if limit else len(pairs)])
    batches = pipeline.make_eval_batches(
        subset,
        tokenizer,
        batch_size=config.data.eval_batch_size,
        max_source_length=config.data.max_source_length,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    hypotheses = translate_batches(setup, params, batches, tokenizer, progress)
    score, signature = bleu_score(hypotheses, [target for _, target in subset])
    return score, signature, hypotheses, subset


def _float_metrics(pending: list[dict[str, jax.Array]]) -> dict[str, float]:
    """Sum the step metrics of one logging interval (read back from the device once)."""
    host = jax.device_get(pending)
    sums = {k: float(sum(m[k] for m in host)) for k in ("loss_sum", "nll_sum", "num_tokens")}
    summary = {
        k: float(v) for k, v in loss.summarize({k: jnp.asarray(v) for k, v in sums.items()}).items()
    }
    summary["grad_norm"] = float(np.mean([m["grad_norm"] for m in host]))
    summary["learning_rate"] = float(host[-1]["learning_rate"])
    summary["target_tokens"] = sums["num_tokens"]
    return summary


def _check_finite(values: dict[str, float], step: int, workdir: epath.Path) -> None:
    """Stop with a message naming the step when the loss stops being a number."""
    bad = [k for k in ("loss", "nll", "grad_norm") if not math.isfinite(values.get(k, 0.0))]
    if bad:
        raise FloatingPointError(
            f"step {step}: {', '.join(bad)} became NaN/inf. The last good checkpoint is kept in "
            f"{workdir / checkpoint.CHECKPOINT_DIR}. Lower optim.learning_rate_scale, raise "
            "optim.warmup_steps, or set optim.clip_norm, then resume from the same workdir."
        )


def new_workdir(root: str = "runs") -> Path:
    """A fresh runs/<timestamp> folder for a run started without --workdir."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(root) / stamp
    suffix = 1
    while path.exists():
        path = Path(root) / f"{stamp}-{suffix}"
        suffix += 1
    return path


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
    workdir = checkpoint.workdir_path(workdir)
    model_config = validate_config(config)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint.write_model_config(workdir, model_config)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

    train_pairs = load_split(config, config.data.train_split)
    valid_pairs = load_split(config, config.data.validation_split)
    tokenizer = prepare_tokenizer(config, workdir, train_pairs, model_config)
    log.info(
        "Data: %d train pairs, %d validation pairs; tokenizer %s (%d pieces).",
        len(train_pairs),
        len(valid_pairs),
        tokenizer.path,
        tokenizer.vocab_size,
    )

    setup, state = build(config, model_config)
    num_devices = jax.device_count()
    rows_per_host = pipeline.rows_for_token_budget(
        config.data.tokens_per_batch,
        config.data.max_target_length,
        jax.process_count(),
        multiple_of=jax.local_device_count() * config.optim.grad_accum_steps,
    )
    train_iter = iter(
        pipeline.make_train_dataset(
            train_pairs,
            tokenizer,
            batch_size=rows_per_host,
            max_source_length=config.data.max_source_length,
            max_target_length=config.data.max_target_length,
            seed=config.seed,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
        )
    )
    valid_batches = pipeline.make_eval_batches(
        valid_pairs,
        tokenizer,
        batch_size=config.data.eval_batch_size,
        max_source_length=config.data.max_source_length,
        max_target_length=config.data.max_target_length,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )

    ckpt = checkpoint.Checkpointer(
        workdir,
        save_every=config.train.checkpoint_every,
        max_to_keep=config.train.max_to_keep,
        async_save=config.train.async_checkpointing,
    )
    rng = jax.random.key(config.seed)
    state, rng = restore_or_init(ckpt, state, rng, setup, train_iter)
    start_step = int(jax.device_get(state.step))
    num_steps = config.train.num_steps
    rows = rows_per_host * jax.process_count()
    step_flops = metrics.train_flops(
        model_config, rows, config.data.max_source_length, config.data.max_target_length
    )
    peak = metrics.peak_tflops(jax.devices()[0].device_kind)
    writer = metrics.MetricWriter(workdir / "tensorboard")
    log.info(
        "Model: %s parameters; mesh %s; %d rows x (%d src + %d tgt) per step; %s",
        f"{sum(x.size for x in jax.tree.leaves(state.params)):,}",
        dict(setup.mesh.shape),
        rows,
        config.data.max_source_length,
        config.data.max_target_length,
        f"resuming at step {start_step}" if start_step else "starting at step 0",
    )
    final: dict[str, float] = {}
    stopped_by = "finished"
    pending: list[dict[str, jax.Array]] = []
    interval_start = time.perf_counter()
    bar = tqdm(
        total=num_steps,
        initial=start_step,
        desc="train",
        unit="step",
        file=sys.stderr,
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
        # Redraw rarely when stderr is a file (CI, nohup), so logs stay readable.
        mininterval=0.1 if sys.stderr.isatty() else 30.0,
    )
    step = start_step
    try:
        with _Preemption() as preemption:
            while step < num_steps:
                batch = to_global(next(train_iter), setup.batch_sharding)
                with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
                    state, step_metrics = setup.train_step(state, batch, rng)
                step += 1
                pending.append(step_metrics)
                bar.update(1)
                if step % config.train.log_every == 0 or step == num_steps:
                    elapsed = time.perf_counter() - interval_start
                    values = _float_metrics(pending)
                    _check_finite(values, step, workdir)
                    values.update(
                        _throughput(values, len(pending), elapsed, step_flops, num_devices, peak)
                    )
                    writer.scalars(step, {f"train/{k}": v for k, v in values.items()})
                    bar.set_postfix(
                        loss=f"{values['loss']:.3f}",
                        lr=f"{values['learning_rate']:.2e}",
                        tok_s=f"{values['tokens_per_sec']:.0f}",
                    )
                    log.info("step %d: %s", step, _format(values))
                    final.update({f"train_{k}": v for k, v in values.items()})
                    pending = []
                    interval_start = time.perf_counter()
                if (
                    config.train.eval_every
                    and step % config.train.eval_every == 0
                    and step < num_steps
                ):
                    final.update(
                        _periodic_eval(
                            setup,
                            state,
                            valid_batches,
                            valid_pairs,
                            tokenizer,
                            config,
                            writer,
                            step,
                        )
                    )
                    interval_start = time.perf_counter()
                ckpt.maybe_save(step, state, train_iter, rng)
                preempted = preemption.should_stop(step)
                if preempted or (stop_after is not None and step >= stop_after):
                    stopped_by = "preempted" if preempted else "stopped"
                    break
        ckpt.maybe_save(step, state, train_iter, rng, force=True)
        ckpt.wait()
    finally:
        bar.close()
        ckpt.close()
    if stopped_by != "finished":
        log.info(
            "Stopped at step %d (%s); checkpoint saved in %s. Run again to resume.",
            step,
            stopped_by,
            ckpt.directory,
        )
        writer.close()
        return TrainResult(step, stopped_by, final, workdir)

    final.update(
        _periodic_eval(
            setup,
            state,
            valid_batches,
            valid_pairs,
            tokenizer,
            config,
            writer,
            step,
        )
    )
    final.update(_final_test(setup, state, tokenizer, config, writer, step, workdir))
    writer.close()
    return TrainResult(step, stopped_by, final, workdir)


def restore_or_init(
    ckpt: checkpoint.Checkpointer,
    state: TrainState,
    rng: jax.Array,
    setup: Setup,
    train_iter: Any,
) -> tuple[TrainState, jax.Array]:
    """Continue from the newest checkpoint in the workdir (state, RNG, data), else start fresh."""
    latest = ckpt.latest_step()
    if latest is None:
        return state, rng
    log.info("Restoring step %d from %s", latest, ckpt.directory)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        state,
        setup.state_shardings,
    )
    restored, saved_rng = ckpt.restore(latest, abstract, train_iter)
    return restored, rng if saved_rng is None else saved_rng


def _throughput(
    values: dict[str, float],
    steps: int,
    elapsed: float,
    step_flops: float,
    devices: int,
    peak: float | None,
) -> dict[str, float]:
    step_time = elapsed / max(steps, 1)
    out = {
        "step_time_s": step_time,
        "tokens_per_sec": values["target_tokens"] / max(elapsed, 1e-9),
        "tflops_per_device": step_flops / step_time / devices / 1e12,
    }
    if peak:
        out["mfu"] = out["tflops_per_device"] / peak
    return out


def _format(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in values.items() if k not in ("target_tokens",))


def _periodic_eval(
    setup: Setup,
    state: TrainState,
    valid_batches: pipeline.EvalBatches,
    valid_pairs: Sequence[Pair],
    tokenizer: Tokenizer,
    config: ml_collections.ConfigDict,
    writer: metrics.MetricWriter,
    step: int,
) -> dict[str, float]:
    """Validation loss over the whole split and greedy sacreBLEU on its first sentences."""
    start = time.perf_counter()
    values = evaluate_loss(setup, state.params, valid_batches)
    limit = config.train.eval_bleu_sentences
    bleu, signature, _, subset = evaluate_bleu(
        setup, state.params, valid_pairs, tokenizer, config, limit
    )
    values["bleu"] = bleu
    writer.scalars(step, {f"validation/{k}": v for k, v in values.items()})
    writer.text(step, "validation/bleu_signature", signature)
    log.info(
        "step %d validation: loss=%.4f nll=%.4f ppl=%.3f BLEU=%.2f on %d sentences (%s) [%.1fs]",
        step,
        values["loss"],
        values["nll"],
        values["perplexity"],
        bleu,
        len(subset),
        signature,
        time.perf_counter() - start,
    )
    return {f"validation_{k}": v for k, v in values.items()}


def _final_test(
    setup: Setup,
    state: TrainState,
    tokenizer: Tokenizer,
    config: ml_collections.ConfigDict,
    writer: metrics.MetricWriter,
    step: int,
    workdir: epath.Path,
) -> dict[str, float]:
    """Decode the whole test split, print samples, write hypotheses and the score."""
    if not config.data.test_split:
        return {}
    test_pairs = load_split(config, config.data.test_split)
    bleu, signature, hyps, subset = evaluate_bleu(
        setup, state.params, test_pairs, tokenizer, config, None, progress=True
    )
    if jax.process_index() == 0:
        (workdir / f"{config.data.test_split}.hyp.txt").write_text("\n".join(hyps) + "\n")
        (workdir / "results.json").write_text(
            json.dumps(
                {
                    "step": step,
                    "split": config.data.test_split,
                    "bleu": bleu,
                    "signature": signature,
                    "num_sentences": len(hyps),
                },
                indent=2,
            )
            + "\n"
        )
    samples = "\n".join(
        f"  src: {src}\n  ref: {ref}\n  hyp: {hyp}"
        for (src, ref), hyp in list(zip(subset, hyps, strict=True))[: config.train.num_samples]
    )
    log.info("Sample translations (%s split):\n%s", config.data.test_split, samples)
    log.info(
        "Test (%s, %d sentences): sacreBLEU %.2f  %s",
        config.data.test_split,
        len(hyps),
        bleu,
        signature,
    )
    writer.scalars(step, {"test/bleu": bleu})
    writer.text(step, "test/samples", samples)
    return {"test_bleu": bleu}
