"""Train-step throughput at the paper's base shape, side by side with PyTorch nn.Transformer.

    python benchmarks/train_throughput.py [--rounds 5] [--steps 4] [--warmup 2] [--batch 32]
        [--length 32] [--dtype float32|bfloat16] [--model base|big] [--no-torch]
        [--torch_malloc]

Both sides: post-LN, ReLU FFN, d_model 512, 8 heads, d_ff 2048, 6+6 layers, one 37000-word
embedding tied to source, target and pre-softmax, sinusoidal positions, dropout 0.1 on
sublayer outputs and embeddings only (the paper's sites; PyTorch's attention and FFN dropouts
are set to transformer-jax's rates, 0), label-smoothed (0.1) cross-entropy,
Adam(0.9, 0.98, 1e-9). Random token batches of batch x length source and target tokens. Each
side runs in its own process (sharing one process slows both), timed in alternating rounds so
both see the same drift in machine load. The table reports each side's median round: target
tokens/s, step time, achieved TFLOP/s (matmul FLOPs of the static shapes, x3 for forward +
backward) and MFU where the chip's peak is known.
PyTorch runs only if it is installed (it is not a project dependency). On CPU the
transformer-jax worker gets the glibc malloc tunables that train.py applies (cpu_malloc.py);
--torch_malloc gives PyTorch the same, for a like-for-like allocator.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax import cpu_malloc
from transformer_jax.config import ModelConfig
from transformer_jax.model import Transformer
from transformer_jax.state import init_state
from transformer_jax.training import metrics, optim, step


def jax_runner(config: ModelConfig, batch: int, length: int, warmup: int) -> Callable[[int], float]:
    """Compile and warm up the jitted train step (state donated); returns steps -> seconds/step."""
    model = Transformer(config)
    optimizer, schedule = optim.make_optimizer(d_model=config.d_model, warmup_steps=4000)
    state = jax.jit(
        lambda: nn.unbox(init_state(model, optimizer, jax.random.key(0), (1, 8), (1, 8)))
    )()
    train_step = jax.jit(
        step.make_train_step(model, optimizer, schedule, label_smoothing=0.1), donate_argnums=0
    )
    rng = np.random.default_rng(0)
    data = {
        "inputs": jnp.asarray(rng.integers(4, config.vocab_size, (batch, length)), jnp.int32),
        "targets": jnp.asarray(rng.integers(4, config.vocab_size, (batch, length)), jnp.int32),
    }
    key = jax.random.key(1)
    carry = {"state": state}

    def run(steps: int) -> float:
        state = carry["state"]
        start = time.perf_counter()
        for _ in range(steps):
            state, m = train_step(state, data, key)
        jax.block_until_ready(m)
        carry["state"] = state
        return (time.perf_counter() - start) / steps

    run(warmup)
    return run


def torch_runner(
    config: ModelConfig, batch: int, length: int, warmup: int
) -> Callable[[int], float]:
    """PyTorch nn.Transformer with the same dimensions and recipe; returns steps -> s/step."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    d, v = config.d_model, config.vocab_size

    class TorchTransformer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(v, d)
            nn.init.normal_(self.embedding.weight, std=d**-0.5)
            self.core = nn.Transformer(
                d_model=d,
                nhead=config.num_heads,
                num_encoder_layers=config.num_encoder_layers,
                num_decoder_layers=config.num_decoder_layers,
                dim_feedforward=config.d_ff,
                dropout=config.dropout_rate,
                activation="relu",
                batch_first=True,
                norm_first=False,
            )
            # nn.Transformer drops at one rate everywhere; match transformer-jax's sites: the
            # residual (sublayer-output) dropouts at dropout_rate, attention weights and the FFN
            # hidden layer at their own rates (0 in the paper's recipe).
            for layer in [*self.core.encoder.layers, *self.core.decoder.layers]:
                layer.dropout.p = config.relu_dropout_rate
                layer.self_attn.dropout = config.attention_dropout_rate
                if hasattr(layer, "multihead_attn"):
                    layer.multihead_attn.dropout = config.attention_dropout_rate
            position = torch.arange(1024, dtype=torch.float32)[:, None]
            inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2) / d)
            table = torch.zeros(1024, d)
            table[:, 0::2] = torch.sin(position * inv_freq)
            table[:, 1::2] = torch.cos(position * inv_freq)
            self.register_buffer("positions", table)
            self.dropout = nn.Dropout(config.dropout_rate)

        def embed(self, ids: Any) -> Any:
            x = self.embedding(ids) * math.sqrt(d) + self.positions[: ids.shape[1]]
            return self.dropout(x)

        def forward(self, src: Any, tgt_in: Any) -> Any:
            mask = self.core.generate_square_subsequent_mask(tgt_in.shape[1])
            y = self.core(self.embed(src), self.embed(tgt_in), tgt_mask=mask, tgt_is_causal=True)
            return y @ self.embedding.weight.T  # tied pre-softmax projection

    model = TorchTransformer()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    rng = np.random.default_rng(0)
    src = torch.from_numpy(rng.integers(4, v, (batch, length)))
    tgt = torch.from_numpy(rng.integers(4, v, (batch, length)))
    tgt_in = torch.cat([torch.full((batch, 1), 3), tgt[:, :-1]], dim=1)

    def one_step() -> None:
        opt.zero_grad(set_to_none=True)
        logits = model(src, tgt_in)
        loss = loss_fn(logits.reshape(-1, v), tgt.reshape(-1))
        loss.backward()
        opt.step()

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            one_step()
        return (time.perf_counter() - start) / steps

    run(warmup)
    return run


def worker(args: argparse.Namespace, config: ModelConfig) -> None:
    """Child process: build one implementation, then time a round per 'run' line on stdin."""
    if args.worker == "jax":
        run = jax_runner(config, args.batch, args.length, args.warmup)
        name = f"transformer-jax ({args.dtype})"
    else:
        import torch

        # Both sides get every core: XLA's CPU backend uses them all by default.
        torch.set_num_threads(os.cpu_count() or 1)
        run = torch_runner(config, args.batch, args.length, args.warmup)
        name = f"PyTorch {torch.__version__} nn.Transformer (float32)"
    print(f"ready {name}", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        # Minor page faults per step next to the time: on CPU they show what the allocator costs.
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        seconds = run(args.steps)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.steps
        print(seconds, faults, flush=True)


def main() -> None:
    """Time both implementations in alternating rounds and print one table of medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="train steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per implementation")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--model", choices=["base", "big"], default="base")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--attention_impl", choices=["einsum", "dot_product"], default="einsum")
    parser.add_argument("--no-torch", dest="torch", action="store_false")
    parser.add_argument(
        "--torch_malloc",
        action="store_true",
        help="give PyTorch transformer-jax's glibc malloc tunables (default: as installed)",
    )
    parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    config = ModelConfig.preset(args.model, dtype=args.dtype, attention_impl=args.attention_impl)
    if args.worker:
        worker(args, config)
        return
    device = jax.devices()[0]
    sides = ["jax"]
    if args.torch:
        if importlib.util.find_spec("torch") is None:
            print("(PyTorch not installed: pip install torch to compare)")
        elif args.dtype != "float32" or device.platform != "cpu":
            print("(PyTorch comparison runs on CPU in float32 only; skipped)")
        else:
            sides.append("torch")
    # One process per implementation: loaded into one process, PyTorch's OpenMP threads and
    # XLA's thread pool slow each other down (by 5-25% here, depending on which ran first).
    # Each child builds and warms up, then waits on stdin, so only one of them runs at a time.
    passthrough = [a for a in sys.argv[1:] if not a.startswith("--worker")]
    workers: dict[str, subprocess.Popen[str]] = {}
    names: dict[str, str] = {}
    # transformer-jax runs as train.py runs it, with the malloc tunables of cpu_malloc.py where
    # they apply; PyTorch runs as installed unless --torch_malloc gives it the same.
    tuned = cpu_malloc.tuned_env_here()
    for side in sides:
        env = tuned if side == "jax" or args.torch_malloc else None
        workers[side] = subprocess.Popen(
            [sys.executable, __file__, *passthrough, "--worker", side],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        names[side] = _reply(workers[side]).removeprefix("ready ")  # Built one at a time.
        if env is not None:
            names[side] += ", tuned malloc"

    # Alternating rounds expose both sides to the same drift in machine load; the median of
    # each side's rounds is what the table reports, the spread shows how noisy the machine was.
    times: dict[str, list[float]] = {side: [] for side in sides}
    faults: dict[str, list[float]] = {side: [] for side in sides}
    for round_index in range(args.rounds):
        for side, process in workers.items():
            time.sleep(1.0)  # Let the other side's threads stop spinning and go idle.
            assert process.stdin is not None
            process.stdin.write("run\n")
            process.stdin.flush()
            seconds, side_faults = map(float, _reply(process).split())
            times[side].append(seconds)
            faults[side].append(side_faults)
        print(
            f"round {round_index + 1}/{args.rounds}: "
            + ", ".join(f"{side} {times[side][-1]:.3f} s/step" for side in sides),
            flush=True,
        )
    for process in workers.values():
        assert process.stdin is not None
        process.stdin.close()
        process.wait()

    _print_table(args, config, device, names, times, faults)


def _print_table(
    args: argparse.Namespace,
    config: ModelConfig,
    device: jax.Device,
    names: dict[str, str],
    times: dict[str, list[float]],
    faults: dict[str, list[float]],
) -> None:
    """The machine line, the table of medians and the ratio of the two sides."""
    flops = metrics.train_flops(config, args.batch, args.length, args.length)
    peak = metrics.peak_tflops(device.device_kind)
    tokens = args.batch * args.length
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__}, device {device.device_kind} x1; model {args.model} "
        f"({config.num_encoder_layers}+{config.num_decoder_layers} layers, d {config.d_model}, "
        f"V {config.vocab_size}); batch {args.batch} x {args.length} src + tgt tokens; "
        f"{flops / 1e9:.1f} GFLOP per step; median of {args.rounds} rounds x {args.steps} steps"
    )
    print(
        "| implementation | step time (ms), median [min-max] | target tokens/s | TFLOP/s | MFU "
        "| page faults/step |"
    )
    print("|---|---|---|---|---|---|")
    medians = {}
    for side, secs in times.items():
        medians[side] = median = statistics.median(secs)
        tflops = flops / median / 1e12
        mfu = f"{tflops / peak:.1%}" if peak else "n/a (CPU)"
        print(
            f"| {names[side]} | {median * 1e3:.1f} [{min(secs) * 1e3:.0f}-{max(secs) * 1e3:.0f}] "
            f"| {tokens / median:,.0f} | {tflops:.3f} | {mfu} "
            f"| {statistics.median(faults[side]):,.0f} |"
        )
    if len(medians) == 2:
        paired = sorted(t / j for j, t in zip(times["jax"], times["torch"], strict=True))
        print(
            f"\ntransformer-jax / PyTorch tokens/s: {medians['torch'] / medians['jax']:.2f}x "
            f"(per-round ratios {paired[0]:.2f}-{paired[-1]:.2f})"
        )


def _reply(process: subprocess.Popen[str]) -> str:
    """The worker's next stdout line; a worker that died is an error with its exit code."""
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"benchmark worker {process.args!r} exited with {process.wait()}")
    return line.strip()


if __name__ == "__main__":
    main()
