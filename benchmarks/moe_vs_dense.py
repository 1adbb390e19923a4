"""The dense default against a mixture of experts with the same active parameters, trained alike.

    python benchmarks/moe_vs_dense.py [--output runs/moe_vs_dense] [--num_steps 1200]
        [--log_every 100] [--runs dense,moe,moe_ragged]

dense is configs/default.py (tiny model, built-in EN->DE corpus); moe is configs/default_moe.py:
8 experts of width 256 in every second encoder and decoder layer, top-2, so a token passes
through 512 hidden units as in the dense FFN (the active parameters match, plus a router).
moe_ragged is the same model with the dropless ragged_dot dispatch. Each run trains for the
same steps on the same data stream (seed 0), then decodes the test split greedily. The script
prints the loss curve (train loss per log interval), test sacreBLEU, training tokens/s over
the run's second half (compilation excluded), parameters, and the routing statistics of the
last interval (auxiliary losses, dropped fraction, the busiest expert's load). Each run is an
ordinary workdir under --output; a finished one is reused, so a rerun only prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "dense": ("default", {}),
    "moe": ("default_moe", {}),
    "moe_ragged": ("default_moe", {"moe_dispatch": "ragged"}),
}
STEP_LINE = re.compile(r"^step (\d+): (.*)$")


def experiment(args: argparse.Namespace, run: str) -> Any:
    """The run's config with the benchmark's step count."""
    sys.path.insert(0, str(ROOT))
    import importlib

    module, overrides = RUNS[run]
    config = importlib.import_module(f"configs.{module}").get_config()
    for field, value in overrides.items():
        config.model[field] = value
    config.train.num_steps = args.num_steps
    config.train.log_every = args.log_every
    config.train.eval_every = 0
    config.train.checkpoint_every = args.num_steps
    return config


class StepLines(logging.Handler):
    """Collects the training loop's "step N: name=value, ..." lines as dicts."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: dict[int, dict[str, float]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        """Parse one log record if it is a step line."""
        match = STEP_LINE.match(record.getMessage())
        if match:
            pairs = (item.split("=", 1) for item in match.group(2).split(", "))
            self.steps[int(match.group(1))] = {k: float(v) for k, v in pairs}


def train(args: argparse.Namespace, run: str) -> dict[str, Any]:
    """Train one run (or reuse it) and return its summary, also written as summary.json."""
    from transformer_jax.training.loop import train_and_evaluate

    workdir = Path(args.output) / run
    summary_path = workdir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary["num_steps"] == args.num_steps:
            print(f"{run}: reusing {workdir}", flush=True)
            return summary
    handler = StepLines()
    logger = logging.getLogger("transformer_jax.training.loop")
    logger.addHandler(handler)
    start = time.time()
    try:
        train_and_evaluate(experiment(args, run), workdir)
    finally:
        logger.removeHandler(handler)
    seconds = time.time() - start
    results = json.loads((workdir / "results.json").read_text())
    steps = handler.steps
    if not steps:
        raise RuntimeError(f"{run}: no step lines were logged; is absl logging at INFO?")
    last = steps[max(steps)]
    second_half = [v["tokens_per_sec"] for s, v in steps.items() if s > args.num_steps // 2]
    summary = {
        "run": run,
        "num_steps": args.num_steps,
        "loss_curve": {str(s): round(v["loss"], 4) for s, v in sorted(steps.items())},
        "test_bleu": results["bleu"],
        "tokens_per_sec": round(sum(second_half) / max(len(second_half), 1)),
        "wall_s": round(seconds),
        "last_interval": {k: v for k, v in last.items() if k.startswith(("aux_loss/", "moe/"))},
        "parameters": parameters(workdir),
    }
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{run}: trained in {seconds:.0f} s -> {workdir}", flush=True)
    return summary


def parameters(workdir: Path) -> dict[str, int]:
    """Total and active-per-token parameter counts of the workdir's model."""
    import jax
    import jax.numpy as jnp

    from transformer_jax.config import ModelConfig
    from transformer_jax.model import Transformer
    from transformer_jax.model.moe import active_parameters

    config = ModelConfig.load(workdir / "model_config.json")
    ones = jnp.ones((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: Transformer(config).init(jax.random.key(0), ones, ones))
    params = shapes["params"]
    total = sum(int(x.size) for x in jax.tree.leaves(params))
    return {"total": total, "active": active_parameters(config, params)}


def table(summaries: list[dict[str, Any]]) -> str:
    """Markdown tables: results, then the loss curves side by side."""
    lines = [
        "| run | parameters (active) | test BLEU | train tokens/s | final loss | "
        "load-balance loss | z-loss | dropped | max expert load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        last, curve = s["last_interval"], s["loss_curve"]

        def cell(name: str, fmt: str, last: dict[str, float] = last) -> str:
            return format(last[name], fmt) if name in last else "-"

        lines.append(
            f"| {s['run']} | {s['parameters']['total']:,} ({s['parameters']['active']:,}) | "
            f"{s['test_bleu']:.2f} | {s['tokens_per_sec']:,} | {curve[max(curve, key=int)]:.3f} | "
            f"{cell('aux_loss/moe_load_balance', '.4f')} | {cell('aux_loss/moe_router_z', '.5f')} "
            f"| {cell('moe/dropped_fraction', '.1%')} | {cell('moe/max_load', '.2f')} |"
        )
    steps = sorted({int(k) for s in summaries for k in s["loss_curve"]})
    lines += ["", "| step | " + " | ".join(s["run"] for s in summaries) + " |"]
    lines.append("|---" * (len(summaries) + 1) + "|")
    for step in steps:
        cells = [f"{s['loss_curve'].get(str(step), float('nan')):.3f}" for s in summaries]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """Train the runs one after another and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="runs/moe_vs_dense")
    parser.add_argument("--num_steps", type=int, default=1200)
    parser.add_argument("--log_every", type=int, default=100)
    parser.add_argument("--runs", default="dense,moe,moe_ragged")
    args = parser.parse_args()
    runs = args.runs.split(",")
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        parser.error(f"--runs: unknown {unknown}; choose from {sorted(RUNS)}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("transformer_jax").setLevel(logging.INFO)
    summaries = [train(args, run) for run in runs]
    print(table(summaries))


if __name__ == "__main__":
    main()
