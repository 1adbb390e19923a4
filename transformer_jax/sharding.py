"""Device meshes and logical-to-mesh axis rules: the only place mesh axis names appear."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# 'expert' holds mixture-of-experts weights (model/moe.py); it splits batch rows like 'data'
# everywhere else, and the dispatch moves each token to its experts' devices (all-to-all).
# 'tensor' stays innermost: its groups share rows and must stay within one host.
MESH_AXES = ("data", "fsdp", "expert", "tensor")
# Auto (GSPMD) axes: XLA propagates shardings from the logical constraints; explicit-axis
# "sharding in types" would demand out_sharding on every gather (the embedding lookup).
AUTO_AXES = (AxisType.Auto,) * len(MESH_AXES)
LogicalRules = tuple[tuple[str, Any], ...]

# Data parallel over data x fsdp x expert; FSDP shards each weight's embed axis; tensor parallel
# splits heads, mlp and vocab (Megatron style), so block-boundary activations stay whole on
# 'tensor'; expert parallel places each expert's weights (and the tokens routed to it) on
# one slice of 'expert' (GShard).
ROW_AXES = ("data", "fsdp", "expert")
DEFAULT_RULES: LogicalRules = (
    ("activation_batch", ROW_AXES),
    # Dispatched tokens [experts, rows, capacity, embed]: experts over 'expert', rows over the
    # rest; the change from activation_batch is the all-to-all.
    ("activation_exp", "expert"),
    ("activation_batch_no_exp", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("layers", None),
    ("exp", "expert"),
)


LOGICAL_AXES = frozenset(name for name, _ in DEFAULT_RULES)
# Every device on 'data': parameters replicated, batches split (inference's default mesh).
DATA_PARALLEL: Mapping[str, int] = {"data": -1}


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fill the one -1 entry so the product equals the device count; explain any mismatch."""
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh.shape: unknown axis {sorted(unknown)}; axes are {MESH_AXES}")
    sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"mesh.shape: only one axis may be -1, got {free}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if any(size == 0 or size < -1 for size in sizes.values()):
        raise ValueError(f"mesh.shape: sizes must be positive or -1, got {sizes}")
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"mesh.shape {sizes}: {num_devices} devices are not divisible by {fixed}"
            )
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"mesh.shape {sizes} needs {math.prod(sizes.values())} devices; {num_devices} present"
        )
    return sizes


def check_experts_divide(num_experts: int, sizes: Mapping[str, int]) -> None:
    """Refuse an 'expert' axis that does not split the experts into equal whole shares."""
    expert = sizes.get("expert", 1)
    if num_experts and expert > 0 and num_experts % expert:
        raise ValueError(
            f"mesh.shape.expert={expert} does not divide model.moe_num_experts={num_experts}: "
            "each slice of 'expert' holds the same number of whole experts; choose a divisor "
            f"of {num_experts}"
        )


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'expert', 'tensor') mesh over the given (default: all) devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_shape(shape, len(devices))
    dims = tuple(sizes[a] for a in MESH_AXES)
    if devices == list(jax.devices()) or devices[0].platform == "tpu":
        # make_mesh orders devices by the physical topology (ICI rings on TPU), also the
        # compile-only devices of an AOT topology.
        mesh = jax.make_mesh(dims, MESH_AXES, devices=devices, axis_types=AUTO_AXES)
        if _rows_stay_on_one_process(_process_ids(mesh)):
            return mesh
        # A ring can cross hosts (a 4-chip 'tensor' axis on 2x2-chip v5e hosts), but each host
        # feeds its own rows: lay the devices out host by host so 'tensor' groups stay local.
        devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices).reshape(dims), MESH_AXES, axis_types=AUTO_AXES)


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> LogicalRules:
    """Normalize config rules (lists from ml_collections) into flax's tuple form."""
    if rules is None:
        return DEFAULT_RULES
    normalized = []
    for rule in rules:
        if len(rule) != 2:
            raise ValueError(f"mesh.logical_axis_rules: each rule is (logical, mesh), got {rule}")
        logical, mesh_axes = rule
        if logical not in LOGICAL_AXES:
            # flax would leave an unknown name unused, so a typo would silently replicate.
            raise ValueError(
                f"mesh.logical_axis_rules: unknown logical axis {logical!r}; the model's are "
                f"{sorted(LOGICAL_AXES)}"
            )
        if isinstance(mesh_axes, list):
            mesh_axes = tuple(mesh_axes)
        for axis in mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,):
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(
                    f"mesh.logical_axis_rules: {logical!r} maps to unknown mesh axis {axis!r}; "
                    f"the mesh axes are {MESH_AXES}"
                )
        normalized.append((logical, mesh_axes))
    return tuple(normalized)


def _process_ids(mesh: Mesh) -> np.ndarray:
    return np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)


def _rows_stay_on_one_process(process_ids: np.ndarray) -> bool:
    groups = process_ids.reshape(-1, process_ids.shape[-1])
    return all(len(set(owners.tolist())) == 1 for owners in groups)


def check_rows_stay_on_one_process(process_ids: np.ndarray) -> None:
    """Refuse a mesh where devices holding the same batch rows belong to different processes.

    process_ids: the process index of each device, laid out as the mesh (MESH_AXES, 'tensor'
    last). Batch rows are split over every axis but 'tensor', so the devices along 'tensor'
    share rows. Each process builds its own rows from its own data shard; if a 'tensor' group
    spans processes, those processes would feed different rows into what must be one copy.
    """
    if _rows_stay_on_one_process(process_ids):
        return
    tensor = process_ids.shape[-1]
    per_process = int((process_ids == process_ids.flat[0]).sum())
    sizes = dict(zip(MESH_AXES, process_ids.shape, strict=True))
    for row_block, owners in enumerate(process_ids.reshape(-1, tensor)):
        if len(set(owners.tolist())) > 1:
            raise ValueError(
                f"mesh.shape {sizes}: the devices sharing batch row block {row_block} (along "
                f"'tensor') belong to processes {sorted(set(owners.tolist()))}, but each "
                f"process feeds its own rows. Keep 'tensor' within one host (at most its "
                f"{per_process} devices) and put the other devices on 'data', 'fsdp' or "
                "'expert'."
            )


def check_mesh_feeds_consistent_rows(mesh: Mesh) -> None:
    """check_rows_stay_on_one_process for a mesh of MESH_AXES."""
    check_rows_stay_on_one_process(_process_ids(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over data x fsdp x expert; everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(ROW_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """Whole on every device."""
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def context(mesh: Mesh, rules: LogicalRules) -> Iterator[None]:
    """The mesh and logical rules that tracing and running the model's functions read."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def to_global(batch: Mapping[str, np.ndarray], rows: NamedSharding) -> dict[str, jax.Array]:
    """Host-local numpy rows -> one global array per key (each process passes its own rows)."""
    return {
        key: jax.make_array_from_process_local_data(rows, value) for key, value in batch.items()
    }


def host_local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a row-sharded global array, in global order (to_global's inverse).

    Read from the addressable shards: no collective, so each process may decode its own rows.
    """
    pieces: dict[int, Any] = {}
    for shard in array.addressable_shards:
        start = (shard.index[0].start or 0) if shard.index else 0
        pieces.setdefault(start, shard.data)  # replicas along 'tensor' hold the same rows
    return np.concatenate([np.asarray(pieces[start]) for start in sorted(pieces)])


def abstract_with_shardings(init_fn: Callable[[], Any], mesh: Mesh, rules: LogicalRules) -> Any:
    """Shapes, dtypes and mesh shardings of what init_fn builds, without computing it.

    The one path from logical names to placement: eval_shape -> logical specs -> mesh
    shardings. init_fn must build boxed (LogicallyPartitioned) leaves so the names are visible;
    the result is unboxed, each leaf a jax.ShapeDtypeStruct carrying its NamedSharding.
    """
    boxed = jax.eval_shape(init_fn)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    # Unboxing outside a trace must not apply the boxes' sharding constraints.
    unboxed = jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
        boxed,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), unboxed, shardings
    )


def shardings_of(abstract: Any) -> Any:
    """The tree of shardings carried by an abstract (or concrete) tree."""
    return jax.tree.map(lambda x: x.sharding, abstract)


def init_sharded(init_fn: Callable[[], Any], shardings: Any) -> Any:
    """Run init_fn (boxed leaves) once, jitted, each leaf born in its sharding: no full copy."""
    return jax.jit(lambda: nn.unbox(init_fn()), out_shardings=shardings)()


def sharded_init(init_fn: Callable[[], Any], mesh: Mesh, rules: LogicalRules) -> tuple[Any, Any]:
    """Initialize state directly into its shardings; returns (state, shardings)."""
    shardings = shardings_of(abstract_with_shardings(init_fn, mesh, rules))
    return init_sharded(init_fn, shardings), shardings


def bytes_per_device(tree: Any) -> dict[int, int]:
    """Bytes each device holds of a pytree of jax.Arrays (to check sharding really splits)."""
    totals: dict[int, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            totals[shard.device.id] = totals.get(shard.device.id, 0) + shard.data.nbytes
    return totals
