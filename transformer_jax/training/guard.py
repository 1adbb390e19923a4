"""Non-finite steps: counted from the step's own on-device flag, and kept out of checkpoints.

The loop hands every step's `finite` flag to a `FiniteGuard` without reading it (so dispatch
stays ahead of the device) and calls `check` where it reads metrics anyway (logging) and before
every save. Without skipping, one non-finite step poisons the state for good: the check stops
the run, and nothing after the last finite checkpoint is saved. With
`optim.skip_nonfinite_updates` such steps leave the state unchanged; the run only stops after
`optim.max_nonfinite_in_a_row` of them in a row.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
from etils import epath

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """The run stopped on NaN/inf; the message names the steps and the checkpoint to resume."""


@dataclasses.dataclass
class FiniteGuard:
    """Tracks which steps were finite; refuses to let a poisoned state be saved."""

    skip: bool  # optim.skip_nonfinite_updates: such steps changed nothing
    max_in_a_row: int  # optim.max_nonfinite_in_a_row: halt after this many (skip mode)
    checkpoint_dir: epath.Path
    last_finite_save: int | None  # the newest checkpoint known to be finite (restored or saved)
    skipped_total: int = 0
    first_bad: int | None = None
    in_a_row: int = 0
    _unchecked: list[tuple[int, jax.Array]] = dataclasses.field(default_factory=list)

    def add(self, step: int, finite: jax.Array) -> None:
        """Remember step's on-device flag (not read yet)."""
        self._unchecked.append((step, finite))

    def check(self, step: int) -> int:
        """Read the flags so far; raise NonFiniteError when the run must stop.

        Returns how many of the steps read were non-finite (skipped, in skip mode).
        """
        flags = jax.device_get([flag for _, flag in self._unchecked])
        steps = [s for s, _ in self._unchecked]
        self._unchecked = []
        bad = 0
        for s, finite in zip(steps, flags, strict=True):
            if bool(finite):
                self.in_a_row = 0
                continue
            bad += 1
            self.skipped_total += 1
            self.in_a_row += 1
            if self.first_bad is None:
                self.first_bad = s
            if not self.skip:
                raise NonFiniteError(self._message(s, step, poisoned=True))
            if self.in_a_row >= self.max_in_a_row:
                raise NonFiniteError(self._message(s, step, poisoned=False))
        return bad

    def saved(self, step: int) -> None:
        """A checkpoint of a checked state was written at step."""
        self.last_finite_save = step

    def _message(self, bad_step: int, found_at: int, poisoned: bool) -> str:
        where = (
            f"the newest finite checkpoint is step {self.last_finite_save} "
            f"({self.checkpoint_dir / str(self.last_finite_save)})"
            if self.last_finite_save is not None
            else "no finite checkpoint exists yet"
        )
        if poisoned:
            head = (
                f"step {bad_step}: the loss, gradients or update became NaN/inf (found at step "
                f"{found_at}); nothing after it is saved, and {where}."
            )
        else:
            head = (
                f"{self.in_a_row} non-finite steps in a row up to step {bad_step} "
                f"(optim.max_nonfinite_in_a_row={self.max_in_a_row}; the first non-finite step "
                f"of this run was {self.first_bad}, {self.skipped_total} skipped in all); "
                f"{where}."
            )
        return (
            f"{head} Lower optim.learning_rate_scale, raise optim.warmup_steps or set "
            "optim.clip_norm (optim.skip_nonfinite_updates=True skips such steps), then run "
            "again on the same workdir to resume."
        )
