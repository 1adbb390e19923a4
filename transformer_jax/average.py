"""python -m transformer_jax.average --workdir DIR --last N: average the last N checkpoints.

The paper (section 6.1) averages the last 5 checkpoints for base and the last 20 for big. The
result is a workdir of its own (default DIR/averaged_last<N>) with the model config, the
tokenizer and one params-only checkpoint, so load/translate/evaluate take it as --workdir.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from transformer_jax.cli import quiet_libraries

if TYPE_CHECKING:
    from transformer_jax.workdir import Workdir


def average_last(workdir: Workdir, last: int, output: Workdir) -> list[int]:
    """Average the `last` newest readable checkpoints; unreadable ones are named and skipped."""
    steps = workdir.steps()
    total, abstract, used = _accumulate(workdir, steps[::-1], last)
    if len(used) < last:
        raise SystemExit(
            f"error: {workdir}: {len(used)} readable checkpoint(s) ({sorted(used)} of {steps}) "
            f"but --last {last} asked; raise train.max_to_keep or average fewer"
        )
    chosen = sorted(used)
    _write_mean(workdir, total, abstract, chosen, output)
    return chosen


def _accumulate(
    workdir: Workdir, candidates: Sequence[int], want: int
) -> tuple[Any, Any, list[int]]:
    """(float64 host sum of up to `want` candidates' parameters, abstract params, steps used)."""
    import logging

    import jax
    import numpy as np

    from transformer_jax import sharding
    from transformer_jax.state import abstract_train_state
    from transformer_jax.workdir import UnreadableCheckpointError

    config = workdir.read_model_config()
    mesh = sharding.make_mesh(sharding.DATA_PARALLEL)
    abstract = abstract_train_state(config, mesh, sharding.DEFAULT_RULES).params
    total: Any = None
    used: list[int] = []
    for step in candidates:
        if len(used) == want:
            break
        try:
            params, _ = workdir.restore_params(step, abstract)
        except UnreadableCheckpointError as e:
            logging.getLogger(__name__).warning("Skipping step %d: %s", step, e)
            continue
        # Accumulate in float64 on the host so the mean does not depend on the order.
        host = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
        total = host if total is None else jax.tree.map(np.add, total, host)
        used.append(step)
        del params
    return total, abstract, used


def _write_mean(
    workdir: Workdir, total: Any, abstract: Any, steps: Sequence[int], output: Workdir
) -> None:
    import jax

    mean = jax.tree.map(lambda x, a: (x / len(steps)).astype(a.dtype), total, abstract)
    workdir.copy_metadata_to(output)
    output.write_averaged_from(workdir, steps)
    output.save_params(max(steps), mean)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, pick the last N steps, average, say where the result is."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a workdir written by train.py")
    parser.add_argument("--last", type=int, required=True, help="how many of the newest steps")
    parser.add_argument("--output", default=None, help="default: WORKDIR/averaged_last<N>")
    args = parser.parse_args(argv)
    if args.last < 1:
        parser.error("--last must be at least 1")
    quiet_libraries()

    from transformer_jax.workdir import Workdir

    workdir = Workdir(args.workdir)
    steps = workdir.steps()
    if len(steps) < args.last:
        raise SystemExit(
            f"{workdir}: {len(steps)} checkpoint(s) ({steps}) but --last {args.last} asked; "
            "raise train.max_to_keep or average fewer"
        )
    output = Workdir(args.output or workdir.averaged_dir(args.last))
    if output.checkpoint_dir.exists():
        raise SystemExit(f"{output}: already holds checkpoints; remove it or pass --output")
    chosen = average_last(workdir, args.last, output)
    print(f"Averaged steps {chosen} of {workdir} into {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
