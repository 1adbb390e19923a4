"""Compile the real train step for a Cloud TPU topology on any machine, and say if it fits.

`python -m transformer_jax.aot --config=configs/X.py --topology=v5e-8 [--config.field=value]`

Needs libtpu (`pip install -e ".[tpu]"`), no TPU: `jax.experimental.topologies` gives
compile-only devices for the named slice, the step is lowered and compiled for them ahead of
time (AOT), and XLA's own memory and cost analyses give per-chip HBM use, FLOPs and bytes per
step. The step-time estimate is a roofline: max(FLOPs / peak FLOP/s, bytes / HBM bandwidth),
ignoring ICI communication, so it is a lower bound.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import topologies
from jax.sharding import Mesh

from transformer_jax import experiment, sharding
from transformer_jax.config import ModelConfig
from transformer_jax.data import pipeline
from transformer_jax.model import moe
from transformer_jax.training import metrics
from transformer_jax.training.program import build
from transformer_jax.workdir import Workdir, first_line

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures of one TPU generation (Cloud TPU system architecture pages)."""

    jax_name: str  # Generation prefix of jax topology names ("v5e:2x2").
    device_kind: str  # jax device_kind, the key into metrics.PEAK_BF16_TFLOPS.
    hbm_gib: float  # HBM capacity per chip.
    hbm_gb_per_s: float  # HBM bandwidth per chip, 1e9 bytes/s.
    dims: int  # 2D torus (v5e, v6e) or 3D (v4, v5p).
    cores_per_chip: int  # The "-N" suffix of v4/v5p slice names counts TensorCores.
    accelerator_type: str  # TPU_ACCELERATOR_TYPE prefix ("v5litepod-8").


# cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e: HBM 32 / 16 / 95 / 32 GiB per chip and
# 1200 / 819 / 2765 / 1640 GB/s; v4 and v5p chips hold two TensorCores run as one megacore.
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "TPU v4", 32.0, 1200.0, 3, 2, "v4"),
    "v5e": Chip("v5e", "TPU v5 lite", 16.0, 819.0, 2, 1, "v5litepod"),
    "v5p": Chip("v5p", "TPU v5", 95.0, 2765.0, 3, 2, "v5p"),
    "v6e": Chip("v6e", "TPU v6 lite", 32.0, 1640.0, 2, 1, "v6e"),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A slice: the user-facing name, its chip type and the jax topology string."""

    name: str
    chip: Chip
    num_chips: int
    jax_topology: str


@dataclasses.dataclass
class Report:
    """What one AOT compile says about a config on a topology (all memory figures per chip)."""

    config: str
    topology: str
    jax_topology: str
    num_chips: int
    mesh: dict[str, int]
    rows: int
    src_len: int
    tgt_len: int
    num_params: int
    active_params: int  # per token: a mixture of experts' unchosen experts left out
    argument_gib: float
    output_gib: float
    alias_gib: float
    temp_gib: float
    code_gib: float
    peak_gib: float
    capacity_gib: float
    flops_per_chip: float
    model_flops_per_chip: float
    bytes_per_chip: float
    peak_tflops: float
    hbm_gb_per_s: float
    compute_s: float
    memory_s: float
    step_s: float
    tokens_per_s: float
    compile_s: float

    @property
    def fits(self) -> bool:
        """Whether XLA's peak estimate stays within HBM."""
        return self.peak_gib <= self.capacity_gib


class DoesNotFitError(RuntimeError):
    """The step needs more HBM per chip than the topology has."""


class TopologyError(RuntimeError):
    """libtpu could not describe the topology (not installed, or an unknown slice)."""


def _torus(num_chips: int, dims: int) -> tuple[int, ...]:
    """The usual slice shape for a chip count: doubled round-robin, small axes first."""
    if num_chips < 1 or num_chips & (num_chips - 1):
        raise ValueError(f"topology: {num_chips} chips is not a power of two")
    shape = [1] * dims
    axis = 0
    while math.prod(shape) < num_chips:
        shape[axis % dims] *= 2
        axis += 1
    if dims == 3 and num_chips == 4:
        return (2, 2, 1)  # The single-host v4-8 / v5p-8 slice.
    return tuple(sorted(shape))


def parse_topology(name: str) -> Topology:
    """'v5e-8', 'v4-8', 'v5p-8', 'v6e-8', 'v5e-256' (Cloud TPU names) or 'v5e:2x4' (jax)."""
    if match := re.fullmatch(r"(v\d+[a-z]?):(\d+(?:x\d+)+)", name):
        generation, shape_text = match.groups()
        chip = _chip(generation, name)
        shape = tuple(int(x) for x in shape_text.split("x"))
        return Topology(name, chip, math.prod(shape), name)
    if match := re.fullmatch(r"(v\d+[a-z]?)(?:litepod)?-(\d+)", name):
        generation, count_text = match.groups()
        generation = "v5e" if name.startswith("v5litepod") else generation
        chip = _chip(generation, name)
        count = int(count_text)
        if count % chip.cores_per_chip:
            raise ValueError(
                f"topology {name!r}: {generation}-N counts TensorCores, N must be even"
            )
        num_chips = count // chip.cores_per_chip
        shape = _torus(num_chips, chip.dims)
        return Topology(name, chip, num_chips, f"{generation}:" + "x".join(map(str, shape)))
    raise ValueError(f"topology {name!r}: expected e.g. v5e-8, v4-8, v5p-8, v6e-8 or v5e:2x4")


# Local accelerators for `--topology=local` (benchmarks on a lent GPU): HBM bandwidth, 1e9
# bytes/s, from NVIDIA's data sheets. Matched in order against device_kind, so the PCIe and
# 40 GB parts come before the names they contain.
LOCAL_HBM_GB_PER_S: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),
    ("H200", 4800.0),
    ("A100-SXM4-40GB", 1555.0),
    ("A100-PCIE-40GB", 1555.0),
    ("A100", 2039.0),
)


def local_topology() -> Topology:
    """The devices of this process (a GPU, or CPU devices) described as a Topology."""
    devices = jax.local_devices()
    kind = devices[0].device_kind
    stats = devices[0].memory_stats() or {}
    # GPUs report their usable memory; CPU devices share the host's RAM, so that is the limit.
    capacity = stats.get("bytes_limit") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    bandwidth = next((v for k, v in LOCAL_HBM_GB_PER_S if k.lower() in kind.lower()), math.nan)
    chip = Chip(devices[0].platform, kind, capacity / GIB, bandwidth, 1, 1, "")
    return Topology("local", chip, len(devices), f"{devices[0].platform} x{len(devices)}")


def _chip(generation: str, name: str) -> Chip:
    if generation not in CHIPS:
        raise ValueError(f"topology {name!r}: unknown TPU generation; known: {sorted(CHIPS)}")
    return CHIPS[generation]


def topology_devices(topology: Topology) -> list[Any]:
    """Compile-only TPU devices for the slice (libtpu, no TPU attached)."""
    # Without a TPU VM's metadata, libtpu logs errors while guessing the host; say it is local.
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # Compiling touches no chip, so several AOT processes (or one beside a training job) may
    # load libtpu at once instead of failing on /tmp/libtpu_lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    accelerator = topology.chip.accelerator_type
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{accelerator}-{topology.num_chips}")
    # v4 and v5p VMs run both TensorCores of a chip as one device (megacore), as training does.
    kwargs: dict[str, Any] = (
        {"chip_config_name": "megacore"} if topology.chip.cores_per_chip == 2 else {}
    )
    if topology.jax_topology.endswith(":2x4") and topology.chip.dims == 2:
        # v5e-8 and v6e-8 are one VM with 8 chips; libtpu's default would model two 4-chip
        # hosts (the multi-host slices' VMs), changing the rows per host and the mesh checks.
        kwargs["chips_per_host_bounds"] = [2, 4, 1]
    try:
        description = topologies.get_topology_desc(
            platform="tpu", topology_name=topology.jax_topology, **kwargs
        )
    except (ImportError, RuntimeError) as e:
        # Only a backend that cannot start points at libtpu; a bad shape is libtpu's own words.
        missing = isinstance(e, ImportError) or "initialize" in str(e) or "libtpu" in str(e)
        hint = '; is libtpu installed? pip install -e ".[tpu]"' if missing else ""
        raise TopologyError(
            f"could not build TPU topology {topology.jax_topology!r}: {first_line(e, 500)}{hint}"
        ) from e
    return list(description.devices)


def topology_mesh(config: ml_collections.ConfigDict, devices: list[Any]) -> Mesh:
    """The config's mesh (sharding.MESH_AXES) over compile-only devices, in topology order."""
    mesh = sharding.make_mesh(dict(config.mesh.shape), devices)
    # train.py would refuse this mesh on the pod (rows fed per host); say so here first.
    sharding.check_mesh_feeds_consistent_rows(mesh)
    return mesh


def compile_train_step(
    config: ml_collections.ConfigDict, topology: Topology, devices: list[Any]
) -> tuple[Any, Report]:
    """Lower and compile the loop's train step for the topology; returns (compiled, report)."""
    # The same checks and the same build as train.py: a config one refuses, both refuse.
    model_config = experiment.validate(config, devices)
    mesh = topology_mesh(config, devices)
    program = build(config, model_config, mesh)
    num_hosts = len({d.process_index for d in devices})
    # Rows as train_and_evaluate picks them on each of the slice's hosts.
    rows = experiment.rows_per_host(config, num_hosts, len(devices) // num_hosts) * num_hosts
    src_len, tgt_len = config.data.max_source_length, config.data.max_target_length
    batch = {
        key: jax.ShapeDtypeStruct(
            (rows, src_len if key in pipeline.SOURCE_KEYS else tgt_len),
            jnp.int32,
            sharding=program.rows,
        )
        for key in pipeline.BATCH_KEYS
    }
    rng = jax.ShapeDtypeStruct(
        (), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=sharding.replicated(mesh)
    )
    with program.context():
        compiled, compile_s = _compile(
            lambda: program.train_step.lower(program.abstract_state, batch, rng),
            "the step",
            _TRAIN_ADVICE,
            topology,
        )
    report = _report(
        config, topology, mesh, compiled, model_config, program.abstract_state, rows, compile_s
    )
    return compiled, report


_TRAIN_ADVICE = (
    "try sharding weights and optimizer state (--config.mesh.shape.fsdp=-1 with the other "
    "axes fixed, e.g. --config.mesh.shape.data=1), a smaller batch "
    "(--config.data.tokens_per_batch) or gradient accumulation "
    "(--config.optim.grad_accum_steps), or a bigger slice"
)
_DECODE_ADVICE = "lower --decode_batch_size or config.decode.max_length"


def _does_not_fit(
    what: str,
    advice: str,
    topology: str,
    capacity_gib: float,
    *,
    peak_gib: float | None = None,
    detail: str = "",
    error: Exception | None = None,
) -> DoesNotFitError:
    """The error for `what` needing more HBM per chip than the topology has, and what to change.

    Either XLA's peak estimate of the compiled program (peak_gib, with detail such as the mesh)
    or XLA's refusal to compile it (error, whose first line ends the message).
    """
    if error is None:
        need = f"{what} needs {peak_gib:.2f} GiB per chip, has {capacity_gib:g} GiB on {topology}"
        return DoesNotFitError(f"does not fit: {need}{detail}; {advice}")
    need = f"XLA could not place {what} in {capacity_gib:g} GiB of HBM per chip on {topology}"
    return DoesNotFitError(f"does not fit: {need}; {advice}\nXLA: {first_line(error, 500)}")


def _compile(
    lower: Callable[[], Any], what: str, advice: str, topology: Topology
) -> tuple[Any, float]:
    """lower().compile() and its seconds; XLA running out of HBM is a DoesNotFitError."""
    start = time.perf_counter()
    try:
        compiled = lower().compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" in str(e) or "memory" in str(e).lower():
            raise _does_not_fit(what, advice, topology.name, topology.chip.hbm_gib, error=e) from e
        raise
    return compiled, time.perf_counter() - start


def _peak_bytes(memory: Any) -> int:
    """Per-chip peak of a compiled program from its memory_analysis()."""
    # Donated arguments are aliased to outputs, so they are counted once.
    return (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
        + memory.generated_code_size_in_bytes
    )


def _cost(compiled: Any) -> dict[str, float]:
    cost = compiled.cost_analysis()
    # Older jax returned one dict per partition in a list; all partitions run the same program.
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def _report(
    config: ml_collections.ConfigDict,
    topology: Topology,
    mesh: Mesh,
    compiled: Any,
    model_config: ModelConfig,
    state: Any,
    rows: int,
    compile_s: float,
) -> Report:
    memory = compiled.memory_analysis()
    arg, out = memory.argument_size_in_bytes, memory.output_size_in_bytes
    alias, temp = memory.alias_size_in_bytes, memory.temp_size_in_bytes
    code = memory.generated_code_size_in_bytes
    peak = _peak_bytes(memory)
    cost = _cost(compiled)
    # The compiled SPMD program is one chip's share; cost_analysis counts that program.
    flops = float(cost.get("flops", 0.0))
    bytes_accessed = float(cost.get("bytes accessed", 0.0))
    src_len, tgt_len = config.data.max_source_length, config.data.max_target_length
    model_flops = metrics.train_flops(model_config, rows, src_len, tgt_len) / topology.num_chips
    peak_tflops = metrics.peak_tflops(topology.chip.device_kind) or float("nan")
    compute_s = flops / (peak_tflops * 1e12)
    memory_s = bytes_accessed / (topology.chip.hbm_gb_per_s * 1e9)
    step_s = max(compute_s, memory_s)
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
    return Report(
        config=str(config.get("name", "")) or "",
        topology=topology.name,
        jax_topology=topology.jax_topology,
        num_chips=topology.num_chips,
        mesh={k: int(v) for k, v in mesh.shape.items()},
        rows=rows,
        src_len=src_len,
        tgt_len=tgt_len,
        num_params=int(num_params),
        active_params=moe.active_parameters(model_config, state.params),
        argument_gib=arg / GIB,
        output_gib=out / GIB,
        alias_gib=alias / GIB,
        temp_gib=temp / GIB,
        code_gib=code / GIB,
        peak_gib=peak / GIB,
        capacity_gib=topology.chip.hbm_gib,
        flops_per_chip=flops,
        model_flops_per_chip=model_flops,
        bytes_per_chip=bytes_accessed,
        peak_tflops=peak_tflops,
        hbm_gb_per_s=topology.chip.hbm_gb_per_s,
        compute_s=compute_s,
        memory_s=memory_s,
        step_s=step_s,
        tokens_per_s=rows * tgt_len / step_s if step_s > 0 else float("nan"),
        compile_s=compile_s,
    )


def check_fits(report: Report) -> None:
    """Raise DoesNotFitError with the numbers and what to change when HBM is exceeded."""
    if not report.fits:
        raise _does_not_fit(
            "the step",
            _TRAIN_ADVICE,
            report.topology,
            report.capacity_gib,
            peak_gib=report.peak_gib,
            detail=f" (mesh {report.mesh}, {report.rows} rows)",
        )


def format_report(report: Report) -> str:
    """The human-readable summary the command prints."""
    r = report
    flops_ratio = r.flops_per_chip / r.model_flops_per_chip if r.model_flops_per_chip else math.nan
    lines = [
        f"topology      {r.topology} = {r.jax_topology}: {r.num_chips} chips, mesh {r.mesh}",
        f"batch         {r.rows} rows x ({r.src_len} src + {r.tgt_len} tgt) tokens; "
        f"{r.num_params:,} parameters"
        + (f" ({r.active_params:,} active per token)" if r.active_params != r.num_params else ""),
        f"HBM per chip  {r.peak_gib:.2f} GiB of {r.capacity_gib:g} GiB "
        f"({100 * r.peak_gib / r.capacity_gib:.0f}%): arguments {r.argument_gib:.2f} + outputs "
        f"{r.output_gib:.2f} - aliased {r.alias_gib:.2f} + temporaries {r.temp_gib:.2f} "
        f"+ code {r.code_gib:.3f}",
        f"FLOPs/step    {r.flops_per_chip / 1e9:,.1f} GFLOP per chip (XLA); "
        f"{r.model_flops_per_chip / 1e9:,.1f} GFLOP from metrics.train_flops "
        f"(ratio {flops_ratio:.2f})",
        f"HBM traffic   {r.bytes_per_chip / 1e9:,.2f} GB per chip per step",
        f"roofline      {1e3 * r.step_s:.2f} ms/step = max(compute {1e3 * r.compute_s:.2f} ms at "
        f"{r.peak_tflops:g} TFLOP/s, memory {1e3 * r.memory_s:.2f} ms at "
        f"{r.hbm_gb_per_s:g} GB/s); no ICI time, so a lower bound",
        f"throughput    <= {r.tokens_per_s:,.0f} target tokens/s (padded slots) on the slice",
        f"compiled in   {r.compile_s:.1f} s",
        "fits" if r.fits else "DOES NOT FIT",
    ]
    return "\n".join(lines)


@dataclasses.dataclass
class DecodeReport:
    """What one AOT compile of beam search says (memory per chip)."""

    config: str
    topology: str
    num_chips: int
    mesh: dict[str, int]
    sentences: int  # the global batch
    src_len: int
    max_length: int
    beam_size: int
    num_params: int
    argument_gib: float
    output_gib: float
    temp_gib: float
    peak_gib: float
    capacity_gib: float
    compile_s: float
    quantization: str = "none"
    kv_cache: str = "float"

    @property
    def fits(self) -> bool:
        """Whether XLA's peak estimate stays within HBM."""
        return self.peak_gib <= self.capacity_gib


def compile_beam_search(
    config: ml_collections.ConfigDict,
    topology: Topology,
    devices: list[Any],
    *,
    beam_size: int = 4,
    alpha: float = 0.6,
    batch_size: int = 32,
    quantization: str = "none",
    kv_cache: str = "float",
) -> tuple[Any, DecodeReport]:
    """Lower and compile the translator's beam search for the topology (the same decoder).

    As `load()` + `Translator.translate` run it: a data-parallel mesh over every chip
    (parameters replicated), batch_size sentences per host of config.data.max_source_length
    tokens, decoding up to config.decode.max_length tokens; quantization and kv_cache as
    load(quantization=..., kv_cache=...) sets them (the parameters then int8 as they would be).
    """
    from transformer_jax.inference.engine import DecodeSettings, JaxEngine
    from transformer_jax.inference.quantize import check_names
    from transformer_jax.state import abstract_train_state

    check_names(quantization, kv_cache, flags=True)
    model_config = experiment.validate(config).replace(quantization=quantization, kv_cache=kv_cache)
    mesh = sharding.make_mesh(sharding.DATA_PARALLEL, devices)
    rules = sharding.rules_from_config(config.mesh.logical_axis_rules)
    num_hosts = len({d.process_index for d in devices})
    per_host = len(devices) // num_hosts
    if batch_size % per_host:
        raise ValueError(
            f"--decode_batch_size={batch_size} must be a multiple of the {per_host} chips per host"
        )
    rows = batch_size * num_hosts
    src_len = config.data.max_source_length
    settings = DecodeSettings(
        beam_size=beam_size,
        alpha=alpha,
        extra_length=config.decode.extra_length,
        max_length=config.decode.max_length,
    )
    params = abstract_train_state(model_config, mesh, rules).params
    engine = JaxEngine(model_config, mesh, rules)
    src = jax.ShapeDtypeStruct((rows, src_len), jnp.int32, sharding=sharding.batch_sharding(mesh))
    rng = jax.ShapeDtypeStruct(
        (), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=sharding.replicated(mesh)
    )
    fn = engine.compiled(settings, src_len)
    with sharding.context(mesh, rules):
        compiled, compile_s = _compile(
            lambda: fn.lower(params, src, rng), "beam search", _DECODE_ADVICE, topology
        )
    memory = compiled.memory_analysis()
    report = DecodeReport(
        config=str(config.get("name", "")) or "",
        topology=topology.name,
        num_chips=topology.num_chips,
        mesh={k: int(v) for k, v in mesh.shape.items()},
        sentences=rows,
        src_len=src_len,
        max_length=settings.output_length(src_len, model_config.max_len),
        beam_size=beam_size,
        num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
        argument_gib=memory.argument_size_in_bytes / GIB,
        output_gib=memory.output_size_in_bytes / GIB,
        temp_gib=memory.temp_size_in_bytes / GIB,
        peak_gib=_peak_bytes(memory) / GIB,
        capacity_gib=topology.chip.hbm_gib,
        compile_s=compile_s,
        quantization=quantization,
        kv_cache=kv_cache,
    )
    return compiled, report


def format_decode_report(report: DecodeReport) -> str:
    """The human-readable summary of a decode compile."""
    r = report
    return "\n".join(
        [
            f"topology      {r.topology}: {r.num_chips} chips, mesh {r.mesh}",
            f"beam search   {r.sentences} sentences x {r.src_len} source tokens, beam "
            f"{r.beam_size}, up to {r.max_length} output tokens; {r.num_params:,} parameters",
            f"precision     weights {'int8' if r.quantization == 'int8' else 'float'}, "
            f"KV cache {r.kv_cache}",
            f"HBM per chip  {r.peak_gib:.2f} GiB of {r.capacity_gib:g} GiB "
            f"({100 * r.peak_gib / r.capacity_gib:.0f}%): arguments {r.argument_gib:.2f} + "
            f"outputs {r.output_gib:.3f} + temporaries {r.temp_gib:.2f}",
            f"compiled in   {r.compile_s:.1f} s",
            "fits" if r.fits else "DOES NOT FIT",
        ]
    )


def _devices_for(topology_name: str) -> tuple[Topology, list[Any]]:
    if topology_name == "local":
        return local_topology(), jax.local_devices()
    topology = parse_topology(topology_name)
    return topology, topology_devices(topology)


def run_decode(
    config: ml_collections.ConfigDict,
    topology_name: str,
    batch_size: int = 32,
    quantization: str = "none",
    kv_cache: str = "float",
) -> DecodeReport:
    """Compile beam search of `config` for `topology_name` and return the report."""
    topology, devices = _devices_for(topology_name)
    _, report = compile_beam_search(
        config,
        topology,
        devices,
        batch_size=batch_size,
        quantization=quantization,
        kv_cache=kv_cache,
    )
    return report


def format_decode_comparison(float_report: DecodeReport, report: DecodeReport) -> str:
    """One line per memory figure: the float decoder against the quantized one, per chip."""
    rows = [
        ("arguments", float_report.argument_gib, report.argument_gib),
        ("temporaries", float_report.temp_gib, report.temp_gib),
        ("peak", float_report.peak_gib, report.peak_gib),
    ]
    weights = "int8" if report.quantization == "int8" else "float"
    precision = f"weights {weights}, KV cache {report.kv_cache}"
    lines = [f"float -> {precision} (GiB per chip)"]
    lines += [
        f"  {name:<12}{a:8.3f} -> {b:8.3f}  ({b / a:.2f}x)" if a else f"  {name:<12}{a} -> {b}"
        for name, a, b in rows
    ]
    return "\n".join(lines)


def run(config: ml_collections.ConfigDict, topology_name: str) -> Report:
    """Compile the train step of `config` for `topology_name` and return the report."""
    topology, devices = _devices_for(topology_name)
    _, report = compile_train_step(config, topology, devices)
    return report


def main() -> None:
    """absl entry point: flags --config (file, with --config.x=y overrides), --topology, --json."""
    from absl import app, flags
    from ml_collections import config_flags

    from transformer_jax.cli import quiet_libraries

    config_flag = config_flags.DEFINE_config_file(
        "config", "configs/default.py", "Experiment config file (a get_config() module)."
    )
    topology_flag = flags.DEFINE_string(
        "topology",
        None,
        "TPU slice: v5e-8, v4-8, v5p-8, v6e-8, v5e-256, ... or v5e:2x4; 'local' for this "
        "machine's own devices (e.g. a GPU).",
    )
    json_flag = flags.DEFINE_bool("json", False, "Print the report as one JSON object.")
    mode_flag = flags.DEFINE_enum(
        "mode",
        "train",
        ["train", "decode"],
        "train: the train step; decode: the translator's beam search (beam 4, "
        "--decode_batch_size sentences per host, config.decode.max_length output tokens).",
    )
    decode_batch_flag = flags.DEFINE_integer(
        "decode_batch_size", 32, "With --mode=decode: sentences per host and batch."
    )
    quantization_flag = flags.DEFINE_string(
        "quantization",
        "none",
        "With --mode=decode: int8 compiles the int8 decoder (load(..., quantization='int8')) "
        "after the float one and reports both.",
    )
    kv_cache_flag = flags.DEFINE_string(
        "kv_cache",
        "float",
        "With --mode=decode: int8 stores the decoding cache as int8 (reported against float).",
    )
    workdir_flag = flags.DEFINE_string(
        "workdir",
        None,
        "With a config whose model_from_workdir is True (configs/finetune.py): the workdir whose "
        "model_config.json is the model (e.g. one written by transformer_jax.convert).",
    )
    flags.mark_flag_as_required("topology")

    def _main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        quiet_libraries()
        # Compile-only devices need no accelerator; on a TPU VM do not grab the chips a
        # training job may be using. jax read JAX_PLATFORMS at import, so this goes through its
        # config; backends start lazily, so it still applies. 'local' means this machine's own.
        if topology_flag.value != "local" and "JAX_PLATFORMS" not in os.environ:
            jax.config.update("jax_platforms", "cpu")
        try:
            # Name the report after the file the user passed (configs carry no name field).
            config_file = config_flags.get_config_filename(flags.FLAGS["config"])
            config = _adopted(config_flag.value, workdir_flag.value)
            quantized = (quantization_flag.value, kv_cache_flag.value) != ("none", "float")
            if mode_flag.value != "decode" and quantized:
                raise ValueError("--quantization and --kv_cache go with --mode=decode")
            if mode_flag.value == "decode":
                topology, batch = str(topology_flag.value), decode_batch_flag.value
                decoded = run_decode(
                    config, topology, batch, quantization_flag.value, kv_cache_flag.value
                )
                decoded = dataclasses.replace(decoded, config=decoded.config or config_file)
                text, payload = format_decode_report(decoded), dataclasses.asdict(decoded)
                if quantized:
                    # The float decoder of the same shapes, for the comparison.
                    baseline = run_decode(config, topology, batch)
                    text += "\n" + format_decode_comparison(baseline, decoded)
                    payload["float"] = dataclasses.asdict(baseline)
                print(json.dumps(payload) if json_flag.value else text)
                if not decoded.fits:
                    raise _does_not_fit(
                        "beam search",
                        _DECODE_ADVICE,
                        decoded.topology,
                        decoded.capacity_gib,
                        peak_gib=decoded.peak_gib,
                    )
                return
            report = run(config, str(topology_flag.value))
            report = dataclasses.replace(report, config=report.config or config_file)
            print(
                json.dumps(dataclasses.asdict(report)) if json_flag.value else format_report(report)
            )
            check_fits(report)
        except (DoesNotFitError, TopologyError, ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    app.run(_main)


def _adopted(config: ml_collections.ConfigDict, workdir: str | None) -> ml_collections.ConfigDict:
    """The config with the workdir's model when it asks for one (model_from_workdir)."""
    experiment.fill_later_fields(config)
    if not config.model_from_workdir:
        if workdir is not None:
            raise ValueError("--workdir is only read for a config with model_from_workdir=True")
        return config
    if workdir is None:
        raise ValueError(
            "config.model_from_workdir=True takes the model from a workdir: pass --workdir DIR"
        )
    return experiment.adopt_workdir_model(config, Workdir(workdir).model_config_path)


if __name__ == "__main__":
    main()
