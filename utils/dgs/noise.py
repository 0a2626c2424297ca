"""Standard normal noise for OGM-GE, fast on the CPU.

On the CPU torch draws normals from one Mersenne Twister on one thread: for the text encoder's
10.5M parameters that is about half of the gradient shaping. Here the CPU fills fixed-size
chunks, each from its own generator seeded from the global one, on all intra-op threads (the
fill releases the GIL; figures in docs/performance.md), with the same numbers for the same
`torch.manual_seed` whatever the thread count. Other devices draw with `torch.randn`, already
parallel there.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

CHUNK = 1 << 17          # elements per generator (512 KiB of float32: the chunk stays in cache)

_threads: tuple[ThreadPoolExecutor, int] | None = None      # the pool and its number of threads


def standard_normal_like(x: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like x of independent N(0, 1) samples."""
    if x.device.type != "cpu":
        return torch.randn_like(x)
    return standard_normal_(torch.empty_like(x, memory_format=torch.contiguous_format))


def standard_normal_(out: torch.Tensor) -> torch.Tensor:
    """Fill a contiguous CPU tensor with independent N(0, 1) samples, in place; returns it."""
    if out.numel() <= CHUNK:
        return out.normal_()                                          # what torch.randn_like draws
    chunks = out.view(-1).split(CHUNK)
    seeds = torch.randint(2**63 - 1, (len(chunks),)).tolist()     # from the global generator
    # One task per thread, each a run of consecutive chunks: a task per chunk wakes a thread for
    # each of the text encoder's 81 chunks, which costs more than the fill it spreads.
    pool, workers = _pool()
    per_task = -(-len(chunks) // workers)
    runs = [(chunks[i: i + per_task], seeds[i: i + per_task]) for i in range(0, len(chunks), per_task)]
    list(pool.map(_fill_standard_normal, *zip(*runs)))
    return out


def _fill_standard_normal(chunks: tuple[torch.Tensor, ...], seeds: list[int]) -> None:
    for chunk, seed in zip(chunks, seeds):
        chunk.normal_(generator=torch.Generator().manual_seed(seed))


def _pool() -> tuple[ThreadPoolExecutor, int]:
    """The noise threads, one per intra-op thread (as many as when first used), and their number."""
    global _threads
    if _threads is None:
        workers = max(1, torch.get_num_threads())
        _threads = ThreadPoolExecutor(workers, thread_name_prefix="noise"), workers
    return _threads
