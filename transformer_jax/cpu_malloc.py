"""Keep XLA:CPU's per-step buffers cheap: re-exec once with glibc malloc tunables.

On CPU, XLA allocates each execution's temporaries as one block (1.3 GB for the base train
step at 32 x 32 tokens). glibc serves a block that large with a fresh mmap and unmaps it on
free, so every step the kernel zero-fills it again, 4 KiB page by page: 326,000 page faults and
0.75-0.93 s of system time per step on a 2-core VM.

Where the kernel offers transparent huge pages (THP "always" or "madvise") and glibc is 2.35 or
newer, `glibc.malloc.hugetlb=1` makes those blocks fault in 2 MiB pages: about 1,100 faults per
base step, and the block is still returned to the system when freed, so resident memory stays
what the step uses. Without THP, one arena, no mmap and no trimming keep the freed block in the
heap for the next step (0 faults), at a cost in memory: with steps queued ahead by async
dispatch, their blocks land in different holes of the heap, and resident memory can reach
several times one block (docs/benchmarks.md, "Host memory").

glibc reads GLIBC_TUNABLES only at start-up, so train.py calls `reexec_if_useful()` first and
the process restarts itself once. It is skipped when JAX is told to use a GPU or TPU, when an
accelerator device node exists, when the C library is not glibc, when the user already chose
malloc tunables, and when TRANSFORMER_JAX_CPU_MALLOC=0. This module imports nothing heavy.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Mapping
from pathlib import Path

HUGEPAGE_TUNABLES = ("glibc.malloc.hugetlb=1",)
# arena_max=1: XLA's worker threads would otherwise get per-thread arenas, which cannot hold a
# block above 64 MiB and fall back to mmap whatever mmap_max says.
HEAP_TUNABLES = (
    "glibc.malloc.arena_max=1",
    "glibc.malloc.mmap_max=0",
    "glibc.malloc.trim_threshold=68719476736",
)
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
OPT_OUT = "TRANSFORMER_JAX_CPU_MALLOC"
MARKER = "TRANSFORMER_JAX_CPU_MALLOC_APPLIED"
# Set by the user, these are choices we must not override (the MALLOC_* forms predate tunables).
USER_MALLOC_VARS = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
ACCELERATOR_NODES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def transparent_hugepages() -> bool:
    """Whether the kernel gives huge pages to memory that asks for them (THP always/madvise)."""
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc, or None for another C library."""
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):
        return None
    if not text.startswith("glibc "):
        return None
    try:
        major, minor = text.split()[1].split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def tunables_for(hugepages: bool, version: tuple[int, int] | None) -> tuple[str, ...]:
    """Huge pages where the kernel and glibc (2.35+, the hugetlb tunable) allow; else the heap."""
    if hugepages and version is not None and version >= (2, 35):
        return HUGEPAGE_TUNABLES
    return HEAP_TUNABLES


# The choice for this machine (read once: a file under /sys and the C library's version).
TUNABLES = tunables_for(transparent_hugepages(), glibc_version())


def is_glibc() -> bool:
    """Whether the running C library is glibc (the tunables mean nothing to musl or macOS)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc ")
    except (AttributeError, ValueError, OSError):
        return False


def accelerator_present() -> bool:
    """Whether a GPU or TPU device node exists (then XLA's temporaries live on the device)."""
    return any(glob.glob(pattern) for pattern in ACCELERATOR_NODES)


def tuned_env(
    environ: Mapping[str, str], *, glibc: bool, accelerator: bool
) -> dict[str, str] | None:
    """The environment to re-exec with, or None when tuning is off, done, unwanted or useless."""
    if environ.get(OPT_OUT, "1") == "0" or MARKER in environ:
        return None
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms and platforms.split(",")[0].strip().lower() != "cpu":
        return None
    if (platforms == "" and accelerator) or not glibc:
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in tunables or any(name in environ for name in USER_MALLOC_VARS):
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, *TUNABLES]))
    env[MARKER] = "1"
    return env


def tuned_env_here() -> dict[str, str] | None:
    """tuned_env for this process: its environment, C library and device nodes."""
    return tuned_env(os.environ, glibc=is_glibc(), accelerator=accelerator_present())


def reexec_if_useful() -> None:
    """Restart this process once with TUNABLES set; a no-op wherever tuned_env says no.

    Call it before any real work: everything done so far in the process is done again.
    """
    env = tuned_env_here()
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # sys.orig_argv is the interpreter's own command line: `python -m x` and options such as
    # -X or -W survive the restart unchanged.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def applied() -> bool:
    """Whether this process was restarted with the tunables (for a log line)."""
    return MARKER in os.environ
