"""``daug-jax bench --peer torch``: each program of the benchmark beside the same computation in
another framework, timed in the same run on the same threads.

The peer's code lives in the top-level ``peers`` package, imported only when asked (the library
never imports torch itself).  A pair is timed as back-to-back calls, daug-jax then peer, so that
both see the same machine load; the ratio peer_time / jax_time (> 1: daug-jax is faster) is the
median of the per-pair ratios.  Parameter counts and matmul + convolution FLOPs of both show
that the two programs are the same computation.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np

PEERS = ("torch",)
# Idle time before each timed call: OpenMP (PyTorch) and Eigen (XLA) worker threads spinning
# after a parallel region would take the cores from whichever framework runs next.
SETTLE_S = 0.2


@dataclasses.dataclass(frozen=True)
class Peer:
    """A loaded peer: its modules (``diffusion``, ``towers``) and where it runs."""
    framework: str
    version: str
    threads: int
    device: str
    diffusion: Any
    towers: Any

    def info(self) -> dict:
        return {"framework": self.framework, "version": self.version, "threads": self.threads,
                "device": self.device}


def load(name: str) -> Peer:
    """Imports a peer (``torch``) and gives it the threads XLA uses; a clear error when missing."""
    if name not in PEERS:
        raise ValueError(f"unknown --peer {name!r}; valid: {', '.join(PEERS)}")
    try:
        torch = importlib.import_module("torch")
    except ImportError as e:
        # A user error like any other: one line from the CLI, exit status 2.
        raise ValueError(f"bench --peer torch needs PyTorch, an optional extra never installed by "
                         f"`make test`: pip install -e '.[peer]' (on a CPU-only machine first "
                         f"pip install torch --index-url https://download.pytorch.org/whl/cpu) "
                         f"({e})") from e
    # the cores this process may use, as XLA:CPU's thread pool does
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(threads)
    on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    diffusion = importlib.import_module("peers.torch_diffusion")
    towers = importlib.import_module("peers.torch_towers")
    return Peer(name, torch.__version__, threads, "cuda" if on_gpu else "cpu", diffusion, towers)


def param_count(tree: Any) -> int:
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))


def compare(jax_call: Callable[[], Any], peer_step: Any, *, jax_flops: float, jax_params: int,
            repeats: int) -> dict:
    """Times ``jax_call`` (its result blocked on) and ``peer_step.call`` (a `peers.PeerStep`) in
    ``repeats`` back-to-back pairs after one warm-up call of each.  jax_flops: matmul +
    convolution FLOPs of one daug-jax call (`bench.matmul_flops`); jax_params: its parameter
    elements.  Returns both times, the per-pair ratios peer / jax and their median ``ratio``,
    and both FLOP and parameter counts."""
    jax.block_until_ready(jax_call())
    peer_step.call()
    jax_times, peer_times = [], []
    for _ in range(repeats):
        time.sleep(SETTLE_S)
        start = time.perf_counter()
        jax.block_until_ready(jax_call())
        jax_times.append(time.perf_counter() - start)
        time.sleep(SETTLE_S)
        start = time.perf_counter()
        peer_step.call()
        peer_times.append(time.perf_counter() - start)
    ratios = [p / j for p, j in zip(peer_times, jax_times)]
    return {"name": peer_step.name, "jax_times_s": jax_times, "peer_times_s": peer_times,
            "jax_median_s": statistics.median(jax_times),
            "peer_median_s": statistics.median(peer_times),
            "ratios": ratios, "ratio": statistics.median(ratios),
            "jax_matmul_flops": float(jax_flops), "peer_matmul_flops": float(peer_step.flops),
            "flop_ratio": float(peer_step.flops) / float(jax_flops),
            "jax_params": int(jax_params), "peer_params": int(peer_step.params)}


def summary_line(label: str, pair: dict) -> str:
    return (f"  {label:<24} torch {pair['peer_median_s'] * 1e3:8.1f} ms vs daug-jax "
            f"{pair['jax_median_s'] * 1e3:8.1f} ms: torch / jax = {pair['ratio']:.2f}x "
            f"(FLOPs {pair['flop_ratio']:.3f}, params {pair['peer_params']} vs "
            f"{pair['jax_params']})")
