"""AOT compilation of the real train step for TPU topologies on a CPU-only machine (libtpu)."""

from __future__ import annotations

import importlib.util
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BAD_CONFIG_VALUES, tiny_train_config, with_value

from transformer_jax import aot

ROOT = Path(__file__).resolve().parents[1]
HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
# The [dev] extra installs libtpu where wheels exist (Linux x86-64); CI must run these tests.
LIBTPU_EXPECTED = (
    os.environ.get("CI") == "true" and sys.platform == "linux" and (platform.machine() == "x86_64")
)
needs_libtpu = pytest.mark.skipif(
    not HAVE_LIBTPU,
    reason='libtpu is not installed (pip install -e ".[dev]" brings it); AOT compiles need it',
)


@pytest.fixture
def fresh_tpu_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset the variables topology_devices fills in when unset; restored afterwards."""
    for var in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "ALLOW_MULTIPLE_LIBTPU_LOAD"):
        monkeypatch.setenv(var, "unused")  # set-then-delete records the original value
        monkeypatch.delenv(var)


def test_ci_has_libtpu_so_the_aot_tests_run() -> None:
    if LIBTPU_EXPECTED:
        assert HAVE_LIBTPU, 'CI on Linux x86-64 must install libtpu (pip install -e ".[dev]")'


def test_missing_libtpu_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from jax.experimental import topologies

    def no_libtpu(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Unable to initialize backend 'tpu'")

    monkeypatch.setattr(topologies, "get_topology_desc", no_libtpu)
    # topology_devices sets these only if unset; the monkeypatch restores them afterwards.
    for name in ("TPU_WORKER_HOSTNAMES", "ALLOW_MULTIPLE_LIBTPU_LOAD", "TPU_ACCELERATOR_TYPE"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
    with pytest.raises(aot.TopologyError, match=r"v5e:2x2.*is libtpu installed"):
        aot.topology_devices(aot.parse_topology("v5e-4"))


@pytest.mark.parametrize(
    ("name", "chips", "jax_topology"),
    [
        ("v5e-4", 4, "v5e:2x2"),
        ("v5e-8", 8, "v5e:2x4"),
        ("v5e-256", 256, "v5e:16x16"),
        ("v6e-8", 8, "v6e:2x4"),
        # v4/v5p names count TensorCores: two per chip.
        ("v4-8", 4, "v4:2x2x1"),
        ("v5p-8", 4, "v5p:2x2x1"),
        ("v4-32", 16, "v4:2x2x4"),
        ("v5litepod-16", 16, "v5e:4x4"),
        ("v5e:2x4", 8, "v5e:2x4"),
    ],
)
def test_parse_topology(name: str, chips: int, jax_topology: str) -> None:
    topology = aot.parse_topology(name)
    assert (topology.num_chips, topology.jax_topology) == (chips, jax_topology)


@pytest.mark.parametrize("name", ["v9-8", "v4-7", "v5e-6", "tpu"])
def test_parse_topology_rejects(name: str) -> None:
    with pytest.raises(ValueError, match="topology"):
        aot.parse_topology(name)


@needs_libtpu
@pytest.mark.parametrize(
    ("name", "hosts"),
    [("v5e-8", 1), ("v6e-8", 1), ("v5e:4x2", 2), ("v4-8", 1), ("v5e-16", 4), ("v5e-256", 64)],
)
def test_compile_only_slices_have_the_cloud_vms_host_count(
    name: str, hosts: int, fresh_tpu_env: None
) -> None:
    devices = aot.topology_devices(aot.parse_topology(name))
    assert len({d.process_index for d in devices}) == hosts


@needs_libtpu
def test_pod_mesh_keeps_each_tensor_group_on_one_host(fresh_tpu_env: None) -> None:
    from transformer_jax import sharding

    # v5e-16: 4 VMs of 2x2 chips. jax.make_mesh would run a 4-chip tensor ring across two VMs.
    devices = aot.topology_devices(aot.parse_topology("v5e-16"))
    mesh = sharding.make_mesh({"data": 4, "tensor": 4}, devices)
    sharding.check_mesh_feeds_consistent_rows(mesh)
    too_wide = sharding.make_mesh({"data": 2, "tensor": 8}, devices)
    with pytest.raises(ValueError, match="at most its 4 devices"):
        sharding.check_mesh_feeds_consistent_rows(too_wide)


@needs_libtpu
@pytest.mark.slow
def test_default_config_compiles_for_v5e_4() -> None:
    from configs import default

    report = aot.run(default.get_config(), "v5e-4")
    assert report.num_chips == 4 and report.mesh == {"data": 4, "fsdp": 1, "expert": 1, "tensor": 1}
    assert report.flops_per_chip > 0 and report.bytes_per_chip > 0
    # XLA's count and the analytic 3x-forward count describe the same matmuls.
    assert 0.5 < report.flops_per_chip / report.model_flops_per_chip < 2.0
    assert 0 < report.peak_gib < report.capacity_gib == 16.0
    assert report.fits and math.isfinite(report.step_s) and report.step_s > 0
    aot.check_fits(report)
    assert "HBM per chip" in aot.format_report(report)


@needs_libtpu
@pytest.mark.slow
def test_moe_config_compiles_for_v5p_8_with_experts_sharded() -> None:
    """configs/default_moe.py (8 experts) on v5p-8's 4 chips with expert=4: 2 experts a chip."""
    import jax

    from configs import default_moe

    config = default_moe.get_config()
    config.mesh.shape.data = -1
    config.mesh.shape.expert = 4
    topology, devices = aot._devices_for("v5p-8")
    compiled, report = aot.compile_train_step(config, topology, devices)
    assert report.mesh == {"data": 1, "fsdp": 1, "expert": 4, "tensor": 1}
    assert report.num_params > report.active_params > 0
    assert 0 < report.peak_gib < report.capacity_gib and report.fits
    assert "active per token" in aot.format_report(report)
    state_shardings = compiled.input_shardings[0][0]
    experts = []
    for path, leaf_sharding in jax.tree_util.tree_flatten_with_path(state_shardings.params)[0]:
        keys = [getattr(p, "key", None) for p in path]
        if "moe" in keys and keys[-1] == "wi":
            experts.append((keys, leaf_sharding))
    assert len(experts) == 2  # one MoE layer in each stack
    for path, leaf_sharding in experts:
        assert leaf_sharding.spec[0] == "expert", (path, leaf_sharding.spec)
        assert leaf_sharding.shard_shape((8, 128, 256))[0] == 2


@needs_libtpu
@pytest.mark.slow
def test_cli_exits_nonzero_when_it_does_not_fit() -> None:
    # ~50M target tokens per step: the logits alone are tens of GiB per v5e chip.
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "transformer_jax.aot",
            "--config=configs/default.py",
            "--topology=v5e-4",
            "--config.data.tokens_per_batch=50000000",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0, result.stdout + result.stderr
    assert "does not fit" in result.stderr
    assert "16 GiB" in result.stderr and "fsdp" in result.stderr


@needs_libtpu
@pytest.mark.slow
def test_memory_benchmark_shows_remat_saving_activations() -> None:
    # benchmarks/memory_vs_length.py on the default model: at long rows the saved activations
    # dominate, and full remat must cut the temporaries while the token budget stays fixed.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import memory_vs_length

    base = memory_vs_length.load_config(str(ROOT / "configs" / "default.py"))
    results = {
        remat: memory_vs_length.measure(
            memory_vs_length.sized(base, 384, remat, "einsum", 12288), "v5e:2x2", "default"
        )
        for remat in ("none", "full")
    }
    # At 384 tokens the saved activations already dominate (at 256 they do not: remat's own
    # temporaries weigh more); 512 shows the same at 1.3x this test's compile time.
    for result in results.values():
        assert result["fits"] and (result["src_len"], result["tgt_len"]) == (384, 384)
        assert result["rows"] == 36  # 12288 tokens at 90% fill, rounded up to 4 devices.
    assert results["full"]["temp_gib"] < 0.7 * results["none"]["temp_gib"]
    # Recomputing the forward pass costs FLOPs: about 4/3 of the plain step.
    assert results["full"]["flops_per_chip"] > 1.2 * results["none"]["flops_per_chip"]


@pytest.mark.parametrize(("field", "value", "message"), BAD_CONFIG_VALUES)
def test_aot_refuses_what_train_refuses(
    field: str, value: object, message: str, small_corpus: Path
) -> None:
    import jax

    config = with_value(tiny_train_config(small_corpus), field, value)
    # The same experiment.validate as train.py, before anything is traced or compiled.
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        aot.compile_train_step(config, aot.local_topology(), jax.local_devices())


@needs_libtpu
@pytest.mark.slow
def test_beam_search_compiles_for_v5e_4() -> None:
    from configs import default

    config = default.get_config()
    config.mesh.shape = {"data": 1, "fsdp": -1, "tensor": 1}  # training's mesh; load() is dp
    report = aot.run_decode(config, "v5e-4", batch_size=16)
    assert report.num_chips == 4 and report.mesh == {"data": 4, "fsdp": 1, "expert": 1, "tensor": 1}
    assert (report.sentences, report.src_len, report.beam_size) == (16, 64, 4)
    assert report.max_length == 96  # config.decode.max_length caps 64 + 50
    assert 0 < report.temp_gib < report.peak_gib < report.capacity_gib == 16.0 and report.fits
    assert "beam search" in aot.format_decode_report(report)
    # The int8 decoder (weights and KV cache), as load(..., quantization=, kv_cache=) runs it.
    int8 = aot.run_decode(config, "v5e-4", batch_size=16, quantization="int8", kv_cache="int8")
    assert (int8.quantization, int8.kv_cache, int8.sentences) == ("int8", "int8", 16)
    assert int8.argument_gib < 0.4 * report.argument_gib  # int8 parameters: about a quarter
    assert int8.fits and "weights int8, KV cache int8" in aot.format_decode_report(int8)
    assert "float -> weights int8" in aot.format_decode_comparison(report, int8)
    with pytest.raises(ValueError, match="--quantization='int4': unknown"):
        aot.run_decode(config, "v5e-4", batch_size=16, quantization="int4")
