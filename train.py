"""Train a Transformer: `python train.py [--config=configs/X.py] [--workdir=DIR] [--config.k=v]`."""

from __future__ import annotations

import logging
import os
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from transformer_jax import cpu_malloc, distributed
from transformer_jax.training.loop import new_workdir, train_and_evaluate

log = logging.getLogger("transformer_jax.train")

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/default.py", "Experiment config file (a get_config() module)."
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run folder (checkpoints, tokenizer, logs); resumes if it has checkpoints."
)

_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() first: set on every host of a multi-host TPU pod slice "
    "(coordinator and process ids are detected there).",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "With --distributed outside Cloud TPU/SLURM (GPU hosts, one machine): host:port of process "
    "0; give --num_processes and --process_id too. Detected on Cloud TPU VMs.",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address.")
_PEER_TIMEOUT = flags.DEFINE_float(
    "peer_timeout",
    120.0,
    "With --distributed: seconds without a heartbeat from another process before this one "
    "exits naming it (instead of waiting in a collective for good).",
)
# Errors a user can act on (a bad config, a corrupt or missing file, NaN): one line, no
# traceback. TRANSFORMER_JAX_TRACEBACK=1 shows the traceback too.
_USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)


# XLA status codes that start the message of a failed collective or device call.
_RUNTIME_STATUS = ("UNKNOWN:", "INTERNAL:", "UNAVAILABLE:", "DEADLINE_EXCEEDED:", "ABORTED:")


def _from_the_runtime(e: BaseException) -> bool:
    """An error raised by XLA's runtime (a collective, a device), not by a check of ours."""
    return isinstance(e, jax.errors.JaxRuntimeError) or str(e).startswith(_RUNTIME_STATUS)


def main(argv: list[str]) -> None:
    """Parse flags and hand over to the library."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # On CPU, restart once with malloc tunables so XLA reuses each step's temporaries instead of
    # page-faulting them in again (transformer_jax/cpu_malloc.py).
    cpu_malloc.reexec_if_useful()
    # Orbax and grain log every save at INFO through absl; keep their warnings, show ours.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("transformer_jax").setLevel(logging.INFO)
    watchdog = None
    if _PEER_TIMEOUT.value <= 0:
        raise app.UsageError(f"--peer_timeout={_PEER_TIMEOUT.value}: must be positive (seconds)")
    if _DISTRIBUTED.value:
        if not _WORKDIR.value:
            # Each host would otherwise invent its own timestamped folder.
            raise app.UsageError("--distributed needs --workdir (the same path on every host)")
        watchdog = distributed.initialize(
            peer_timeout_s=_PEER_TIMEOUT.value,
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
        log.info("Process %d of %d", jax.process_index(), jax.process_count())
    if cpu_malloc.applied():
        log.info(
            "CPU: restarted with GLIBC_TUNABLES=%s so step buffers are reused "
            "(%s=0 turns this off)",
            os.environ.get("GLIBC_TUNABLES"),
            cpu_malloc.OPT_OUT,
        )
    workdir = _WORKDIR.value or str(new_workdir())
    log.info("Workdir: %s", workdir)
    try:
        result = train_and_evaluate(_CONFIG.value, workdir)
    except Exception as e:
        if watchdog is not None and _from_the_runtime(e):
            # A collective that failed may mean a lost peer: let the watchdog name it.
            watchdog.verdict()
        if not isinstance(e, _USER_ERRORS) or os.environ.get("TRANSFORMER_JAX_TRACEBACK") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        print(
            "(TRANSFORMER_JAX_TRACEBACK=1 shows where it was raised)", file=sys.stderr, flush=True
        )
        sys.exit(1)
    log.info("Done (%s at step %d). Workdir: %s", result.stopped_by, result.step, workdir)


if __name__ == "__main__":
    app.run(main)
