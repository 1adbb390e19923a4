"""python -m transformer_jax.average --workdir DIR --last N: average the last N checkpoints.

The paper (section 6.1) averages the last 5 checkpoints for base and the last 20 for big. The
result is a workdir of its own (default DIR/averaged_last<N>) with the model config, the
tokenizer and one params-only checkpoint, so load/translate/evaluate take it as --workdir.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from transformer_jax.cli import quiet_libraries

if TYPE_CHECKING:
    from transformer_jax.workdir import Workdir


def average_last(workdir: Workdir, last: int, output: Workdir) -> list[int]:
    """Average the `last` newest readable checkpoints; unreadable ones are named and skipped."""
    from transformer_jax import sharding
    from transformer_jax.state import abstract_train_state
    from transformer_jax.workdir import mean_params

    steps = workdir.steps()
    mesh = sharding.make_mesh(sharding.DATA_PARALLEL)
    abstract = abstract_train_state(workdir.read_model_config(), mesh, sharding.DEFAULT_RULES)
    used: list[int] = []
    mean = mean_params(
        _readable(workdir, steps[::-1], last, abstract.params, used), abstract.params
    )
    if len(used) < last:
        raise SystemExit(
            f"error: {workdir}: {len(used)} readable checkpoint(s) ({sorted(used)} of {steps}) "
            f"but --last {last} asked; raise train.max_to_keep or average fewer"
        )
    chosen = sorted(used)
    workdir.copy_metadata_to(output)
    output.write_averaged_from(workdir, chosen)
    output.save_params(max(chosen), mean)
    return chosen


def _readable(
    workdir: Workdir, candidates: Sequence[int], want: int, abstract: Any, used: list[int]
) -> Iterator[Any]:
    """The parameters of up to `want` readable candidates, appending each step to `used`."""
    import logging

    from transformer_jax.workdir import UnreadableCheckpointError

    for step in candidates:
        if len(used) == want:
            return
        try:
            params, _ = workdir.restore_params(step, abstract)
        except UnreadableCheckpointError as e:
            logging.getLogger(__name__).warning("Skipping step %d: %s", step, e)
            continue
        used.append(step)
        yield params


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
