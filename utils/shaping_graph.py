"""The gradient shaping of all encoder groups on the GPU, replayed from a CUDA graph.

Why: on the GPU a step is bound by the host (README, "Where the time goes"). The flat shaping
(`utils/shaping.py: shape_flat`) of M3Net's three encoder groups launches about 180 small
kernels, about 5 ms of host time on an H200 in a MELD step of 28 ms, for well under a
millisecond of GPU work. Its shapes are the parameters', the same at every step, so it is
captured once and replayed: the step then copies the gradients into the graph's inputs (one
concatenation each for g_mm and g_u) and launches the graph.

- One graph per kind of call: with or without g_u (MMPareto), with or without κ (OGM, off
  outside the modulation epochs). They are captured on one side stream into one memory pool,
  so their scratch memory is shared: they never run at once.
- OGM-GE's noise is drawn inside the graph from torch's generator, which every replay
  advances: a new draw each step, and for the same seed the draws of the eager shaping.
- The outputs are the graph's own buffers, overwritten by the next replay: the step hands them
  to the optimizer at once, and the cosines are copied out.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.cuda_graphs import WARMUP_RUNS, capturing
from utils.segments import segment_ids
from utils.shaping import shape_flat


def capture(body: Callable[[], None], device: torch.device, pool: tuple | None,
            stream: torch.cuda.Stream | None) -> tuple[Callable[[], None], tuple, torch.cuda.Stream]:
    """Capture `body`, which reads and writes fixed CUDA tensors only, into a CUDA graph in the
    memory pool `pool`, on the side stream `stream` (new ones for None). Eager warm-up runs come
    first, on that stream, and leave torch's generator as they found it. Returns the graph's
    replay, the pool and the stream: graphs captured on one stream can share a pool's memory
    (the allocator reuses a block only on the stream that made it)."""
    with torch.cuda.device(device):
        pool = torch.cuda.graph_pool_handle() if pool is None else pool
        stream = torch.cuda.Stream() if stream is None else stream
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            with torch.random.fork_rng(devices=[device]):
                for _ in range(WARMUP_RUNS):
                    body()
            with capturing(graph, pool):
                body()
        torch.cuda.current_stream().wait_stream(stream)
    return graph.replay, pool, stream


@dataclass
class _Graph:
    g_mm: torch.Tensor                  # inputs: every group's tensors flattened and concatenated
    g_uni: torch.Tensor | None
    coeff: torch.Tensor | None          # [G]
    out: torch.Tensor                   # outputs: the shaped gradients, concatenated as the inputs
    cos: torch.Tensor | None            # [G]
    replay: Callable[[], None] = lambda: None
    reads: tuple = ()                   # cached tensors the graph reads: kept alive with it

    def load(self, g_mm: list[list[torch.Tensor]], g_uni: list[list[torch.Tensor]] | None,
             coeff: torch.Tensor | None) -> None:
        torch.cat([g.reshape(-1) for group in g_mm for g in group], out=self.g_mm)
        if g_uni is not None:
            torch.cat([g.reshape(-1) for group in g_uni for g in group], out=self.g_uni)
        if coeff is not None:
            self.coeff.copy_(coeff)


class ShapingGraphs:
    """`utils/shaping.py: shape_groups` on CUDA tensors, replayed from CUDA graphs."""

    def __init__(self):
        self.graphs: dict[tuple, _Graph] = {}
        self.pool: tuple | None = None
        self.stream: torch.cuda.Stream | None = None

    def __call__(self, g_mm: list[list[torch.Tensor]], g_uni: list[list[torch.Tensor]] | None,
                 coeff: torch.Tensor | None, gaussian_noise: bool, gamma: float
                 ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        sizes = tuple(tuple(g.numel() for g in group) for group in g_mm)
        first = g_mm[0][0]
        key = (sizes, g_uni is not None, coeff is not None, gaussian_noise, gamma, first.device, first.dtype)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(sizes, g_mm, g_uni, coeff, gaussian_noise, gamma)
        graph.load(g_mm, g_uni, coeff)
        graph.replay()
        return list(graph.out.split([sum(group) for group in sizes])), None if graph.cos is None else graph.cos.clone()

    def _capture(self, sizes: tuple[tuple[int, ...], ...], g_mm: list[list[torch.Tensor]],
                 g_uni: list[list[torch.Tensor]] | None, coeff: torch.Tensor | None, gaussian_noise: bool,
                 gamma: float) -> _Graph:
        first, total, groups = g_mm[0][0], sum(map(sum, sizes)), len(sizes)
        graph = _Graph(g_mm=first.new_empty(total), g_uni=None if g_uni is None else first.new_empty(total),
                       coeff=None if coeff is None else first.new_empty(coeff.shape), out=first.new_empty(total),
                       cos=None if g_uni is None else first.new_empty(groups))
        graph.load(g_mm, g_uni, coeff)        # the first warm-up run sees real gradients

        def body() -> None:
            flats, cosines, start = [], [], 0
            for i, group in enumerate(sizes):
                part = slice(start, start + sum(group))
                start = part.stop
                flat, cos = shape_flat(graph.g_mm[part], None if g_uni is None else graph.g_uni[part], list(group),
                                       None if coeff is None else graph.coeff[i], gaussian_noise, gamma)
                flats.append(flat)
                cosines.append(cos)
            torch.cat(flats, out=graph.out)
            if graph.cos is not None:
                torch.stack(cosines, out=graph.cos)

        # The per-element tensor ids of each group (utils/segments.py), from a bounded cache
        # that may drop them later: the graph reads them at every replay. Made here, before the
        # capture, where their host-to-device copy is allowed.
        graph.reads = tuple(segment_ids(group, first.device) for group in sizes)
        graph.replay, self.pool, self.stream = capture(body, first.device, self.pool, self.stream)
        return graph
