"""Shared fixtures: a small parallel corpus on disk and a CPU-sized training config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

ROOT = Path(__file__).resolve().parents[1]
# configs/ is imported by path, as train.py does from the repository root.
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/validation/test .en/.de files cut from the built-in corpus (small, fast)."""
    from transformer_jax.data.corpus import CorpusSizes, write_builtin_corpus

    directory = tmp_path_factory.mktemp("corpus")
    write_builtin_corpus(directory, seed=0, sizes=CorpusSizes(train=800, validation=32, test=32))
    return directory


def tiny_train_config(corpus: Path) -> ml_collections.ConfigDict:
    """configs/default.py shrunk to seconds: text-file source, a 2-layer 32-wide model."""
    from configs import default

    config = default.get_config()
    config.data.kind = "text"
    config.data.options = ml_collections.ConfigDict(
        {"source_path": str(corpus / "{split}.en"), "target_path": str(corpus / "{split}.de")}
    )
    config.model.vocab_size = 256
    config.model.d_model = 32
    config.model.num_heads = 2
    config.model.d_ff = 64
    config.model.num_encoder_layers = 1
    config.model.num_decoder_layers = 1
    config.model.max_len = 64
    config.data.tokenizer.vocab_size = 256
    config.data.max_source_length = 48
    config.data.max_target_length = 48
    config.data.tokens_per_batch = 256
    config.data.eval_batch_size = 16
    config.optim.warmup_steps = 10
    config.train.num_steps = 6
    config.train.log_every = 2
    config.train.eval_every = 0
    config.train.eval_bleu_sentences = 16
    config.train.checkpoint_every = 2
    config.train.async_checkpointing = False
    config.decode.max_length = 24
    return config


# (config field, bad value, what the error must name): refused before anything compiles.
BAD_CONFIG_VALUES = [
    ("model.d_model", 33, "config.model"),
    ("train.num_steps", 0, "config.train.num_steps"),
    ("optim.label_smoothing", 1.5, "config.optim.label_smoothing"),
    ("data.max_target_length", 4096, "config.data.max_target_length"),
    ("data.tokenizer.vocab_size", 5000, "config.data.tokenizer.vocab_size"),
    ("decode.max_length", None, "config.decode.max_length"),
]


def with_value(
    config: ml_collections.ConfigDict, field: str, value: object
) -> ml_collections.ConfigDict:
    """The config with one dotted field set (ml_collections refuses a type change via setattr)."""
    section, _, name = field.rpartition(".")
    target = config
    for part in section.split("."):
        target = target[part]
    with target.unlocked():
        target[name] = value
    return config


@pytest.fixture(scope="session")
def trained_workdir(small_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir from a short run on the small corpus: checkpoints at steps 10, 20, 30."""
    from transformer_jax.training.loop import train_and_evaluate

    config = tiny_train_config(small_corpus)
    config.train.num_steps = 30
    config.train.checkpoint_every = 10
    config.train.max_to_keep = 5
    config.train.log_every = 10
    config.data.test_split = ""
    workdir = tmp_path_factory.mktemp("trained")
    train_and_evaluate(config, workdir)
    return workdir


def checkpoint_params(workdir: Path, step: int) -> list:
    """One checkpoint's parameters as numpy leaves, read on one device."""
    import jax
    import numpy as np

    from transformer_jax import sharding
    from transformer_jax.state import abstract_train_state
    from transformer_jax.workdir import Workdir

    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    run = Workdir(workdir)
    abstract = abstract_train_state(run.read_model_config(), mesh, sharding.DEFAULT_RULES).params
    params, step_read = run.restore_params(step, abstract)
    assert step_read == step
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def run_module(module: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """python -m module args, from the repository root, CPU only."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        input=stdin,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def step_by_step(model, params: dict, src, tgt, capacity: int, on_step=None):
    """Logits [B, T, V] of cached decoding fed tgt's tokens one step at a time (BOS first).

    model is a Transformer or an Ensemble; the cache starts with `capacity` slots and
    on_step(t, cache), if given, sees the cache after each step.
    """
    import numpy as np

    from transformer_jax.config import BOS_ID
    from transformer_jax.model import init_cache

    encoded = model.apply({"params": params}, src, method="encode")
    cache = init_cache(model, params, encoded, src, max_length=capacity)
    previous = np.full((src.shape[0], 1), BOS_ID, np.int32)
    steps = []
    for t in range(tgt.shape[1]):
        logits, mutated = model.apply(
            {"params": params, "cache": cache},
            encoded,
            src,
            previous,
            decode=True,
            mutable=["cache"],
            method="decode",
        )
        cache = mutated["cache"]
        if on_step is not None:
            on_step(t, cache)
        steps.append(np.asarray(logits[:, 0]))
        previous = tgt[:, t : t + 1]
    return np.stack(steps, axis=1)
