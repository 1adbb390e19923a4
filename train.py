"""Train a Transformer: `python train.py [--config=configs/X.py] [--workdir=DIR] [--config.k=v]`."""

from __future__ import annotations

import logging
import os

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from transformer_jax import cpu_malloc
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
    if _DISTRIBUTED.value:
        if not _WORKDIR.value:
            # Each host would otherwise invent its own timestamped folder.
            raise app.UsageError("--distributed needs --workdir (the same path on every host)")
        jax.distributed.initialize()
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
    result = train_and_evaluate(_CONFIG.value, workdir)
    log.info("Done (%s at step %d). Workdir: %s", result.stopped_by, result.step, workdir)


if __name__ == "__main__":
    app.run(main)
