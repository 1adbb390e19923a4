"""cpu_malloc: when the malloc tunables apply, the restart keeps the command, and faults vanish."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from transformer_jax import cpu_malloc

TUNED = ":".join(cpu_malloc.TUNABLES)


@pytest.mark.parametrize(
    ("environ", "glibc", "accelerator", "expected"),
    [
        ({}, True, False, TUNED),
        ({"JAX_PLATFORMS": "cpu"}, True, True, TUNED),  # CPU asked for on an accelerator host
        ({}, True, True, None),  # the step's temporaries live on the device there
        ({"JAX_PLATFORMS": "tpu"}, True, False, None),
        ({"JAX_PLATFORMS": "cuda,cpu"}, True, False, None),
        ({}, False, False, None),  # musl, macOS: the tunables mean nothing
        ({cpu_malloc.OPT_OUT: "0"}, True, False, None),
        ({cpu_malloc.MARKER: "1"}, True, False, None),  # already restarted: never loop
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}, True, False, None),  # user's choice
        ({"MALLOC_ARENA_MAX": "2"}, True, False, None),
        ({"GLIBC_TUNABLES": "glibc.cpu.x86_ibt=on"}, True, False, "glibc.cpu.x86_ibt=on:" + TUNED),
    ],
)
def test_tuned_env_decides_when_to_restart(
    environ: dict[str, str], glibc: bool, accelerator: bool, expected: str | None
) -> None:
    env = cpu_malloc.tuned_env(environ, glibc=glibc, accelerator=accelerator)
    if expected is None:
        assert env is None
    else:
        assert env is not None
        assert env["GLIBC_TUNABLES"] == expected
        assert env[cpu_malloc.MARKER] == "1"
        assert {k: v for k, v in env.items() if k not in ("GLIBC_TUNABLES", cpu_malloc.MARKER)} == {
            k: v for k, v in environ.items() if k != "GLIBC_TUNABLES"
        }


needs_glibc = pytest.mark.skipif(not cpu_malloc.is_glibc(), reason="glibc malloc tunables only")


def _clean_env() -> dict[str, str]:
    """This environment minus any malloc settings, with JAX on CPU."""
    env = {k: v for k, v in os.environ.items() if k not in cpu_malloc.USER_MALLOC_VARS}
    env.pop("GLIBC_TUNABLES", None)
    env.pop(cpu_malloc.MARKER, None)
    env.pop(cpu_malloc.OPT_OUT, None)
    return {**env, "JAX_PLATFORMS": "cpu"}


@needs_glibc
def test_restart_keeps_interpreter_options_and_arguments(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, os, sys
            from transformer_jax import cpu_malloc
            cpu_malloc.reexec_if_useful()
            print(json.dumps({"argv": sys.argv[1:], "utf8": sys.flags.utf8_mode,
                              "tunables": os.environ.get("GLIBC_TUNABLES"),
                              "applied": cpu_malloc.applied(), "pid": os.getpid()}))
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-X", "utf8", str(script), "--flag", "a b", "-x"],
        stdout=subprocess.PIPE,
        text=True,
        env=_clean_env(),
    )
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    report = json.loads(out.strip().splitlines()[-1])
    assert report["argv"] == ["--flag", "a b", "-x"]
    assert report["utf8"] == 1  # the -X option survived the restart
    assert report["tunables"] == TUNED
    assert report["applied"] is True
    assert report["pid"] == proc.pid  # execve: the same process, so signals still reach it


FAULTS_CHILD = """
import resource, jax, jax.numpy as jnp
# A [8192, 4096] float32 product (128 MiB) that two reductions read: XLA must materialise it as
# a temporary, which is what the train step's logits are.
f = jax.jit(lambda x, y: jnp.sum(jnp.sin(x @ y)) + jnp.max(x @ y))
x, y = jnp.ones((8192, 16)), jnp.ones((16, 4096))
faults = []
for _ in range(11):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x, y).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[1:]))
"""


def _faults_per_call(env: dict[str, str]) -> float:
    """Fewest minor page faults in a call of FAULTS_CHILD's function, after the first call."""
    out = subprocess.run(
        [sys.executable, "-c", FAULTS_CHILD],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


@needs_glibc
def test_tunables_stop_xla_refaulting_its_temporaries() -> None:
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[always]" in thp.read_text():
        pytest.skip("THP=always: the kernel already faults the block in 2 MiB pages")
    plain = _faults_per_call(_clean_env())
    tuned = _faults_per_call({**_clean_env(), "GLIBC_TUNABLES": TUNED})
    # 128 MiB in 4 KiB pages is 32768 faults, and plain glibc maps the block afresh on every
    # call. Tuned with huge pages (THP "madvise"), it faults in 64 pages of 2 MiB; tuned without,
    # calls reuse the freed block (the heap still grows now and then, one call in five to ten
    # here, when a block is allocated before the last one is freed).
    assert plain > 16_000, plain
    assert tuned < plain / 20, (plain, tuned)


@pytest.mark.parametrize(
    ("hugepages", "version", "expected"),
    [
        (True, (2, 36), cpu_malloc.HUGEPAGE_TUNABLES),
        (True, (2, 35), cpu_malloc.HUGEPAGE_TUNABLES),
        (True, (2, 31), cpu_malloc.HEAP_TUNABLES),  # no glibc.malloc.hugetlb before 2.35
        (False, (2, 36), cpu_malloc.HEAP_TUNABLES),  # THP "never": the heap keeps the block
        (True, None, cpu_malloc.HEAP_TUNABLES),
    ],
)
def test_huge_pages_where_the_kernel_and_glibc_allow(
    hugepages: bool, version: tuple[int, int] | None, expected: tuple[str, ...]
) -> None:
    assert cpu_malloc.tunables_for(hugepages, version) == expected
