"""The gradient shaping of all encoder groups on the GPU, replayed from a CUDA graph.

Why: on the GPU a step is bound by the host (docs/performance.md). The flat shaping
(`utils/dgs/shaping.py: shape_flat`) of M3Net's three encoder groups launches about 180 small
kernels, whose host time is a sizeable share of a MELD step for little GPU work. Its shapes are
the parameters', the same at every step, so it is captured once and replayed: the step then
copies the gradients into the graph's inputs (one concatenation each for g_mm and g_u) and
launches the graph.

- One graph per kind of call: with or without g_u (MMPareto), with or without κ (OGM, off
  outside the modulation epochs). They are captured on one side stream into one memory pool,
  so their scratch memory is shared: they never run at once.
- OGM-GE's noise is drawn inside the graph from torch's generator, which every replay
  advances: a new draw each step, and for the same seed the draws of the eager shaping.
- The outputs are the graph's own buffers, overwritten by the next replay: the step hands them
  to the optimizer at once, and the cosines are copied out.
- Fail-safe: a capture that fails, or a graph's first replay whose results differ from the
  eager shaping's on the same gradients beyond float32 rounding (`_cosine_mismatch`,
  `_gradient_mismatch`; the noise drawn from the same generator state), sends the shaping back
  to eager for the rest of the run, with a line for the run's log (`take_notices`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from utils.cuda_capture import (UNIT_ROUNDOFF, WARMUP_RUNS, capturing, drawing_from, fallback_notice, first_line,
                                generator_state, mismatch, rounding_error_bound, rounding_tolerance)
from utils.dgs.segments import segment_ids
from utils.dgs.shaping import shape_flat, shape_groups


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
    checked: bool = False               # its first replay agreed with the eager shaping

    def load(self, g_mm: list[list[torch.Tensor]], g_uni: list[list[torch.Tensor]] | None,
             coeff: torch.Tensor | None) -> None:
        torch.cat([g.reshape(-1) for group in g_mm for g in group], out=self.g_mm)
        if g_uni is not None:
            torch.cat([g.reshape(-1) for group in g_uni for g in group], out=self.g_uni)
        if coeff is not None:
            self.coeff.copy_(coeff)

    def outputs(self, sizes: tuple[tuple[int, ...], ...]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        return list(self.out.split([sum(group) for group in sizes])), None if self.cos is None else self.cos.clone()


class ShapingGraphs:
    """`utils/dgs/shaping.py: shape_groups` on CUDA tensors, replayed from CUDA graphs; eagerly once a
    capture failed or a first replay differed from the eager shaping."""

    PART = "the gradient shaping"

    def __init__(self):
        self.graphs: dict[tuple, _Graph] = {}
        self.pool: tuple | None = None
        self.stream: torch.cuda.Stream | None = None
        self.eager_because: str | None = None      # why it runs eagerly, once it does
        self.notices: list[str] = []               # lines for the run's log (`take_notices`)

    def __call__(self, g_mm: list[list[torch.Tensor]], g_uni: list[list[torch.Tensor]] | None,
                 coeff: torch.Tensor | None, gaussian_noise: bool, gamma: float
                 ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        if self.eager_because is not None:
            return shape_groups(g_mm, g_uni, coeff, gaussian_noise, gamma)
        sizes = tuple(tuple(g.numel() for g in group) for group in g_mm)
        first = g_mm[0][0]
        key = (sizes, g_uni is not None, coeff is not None, gaussian_noise, gamma, first.device, first.dtype)
        graph = self.graphs.get(key)
        if graph is None:
            try:
                graph = self.graphs[key] = self._capture(sizes, g_mm, g_uni, coeff, gaussian_noise, gamma)
            except RuntimeError as e:        # a CudaGraphError, or CUDA's own in a warm-up run
                self._fall_back(f"capturing its CUDA graph failed ({first_line(e)})")
                return shape_groups(g_mm, g_uni, coeff, gaussian_noise, gamma)
        graph.load(g_mm, g_uni, coeff)
        if not graph.checked:
            return self._first_replay(graph, sizes, g_mm, g_uni, coeff, gaussian_noise, gamma)
        graph.replay()
        return graph.outputs(sizes)

    def take_notices(self) -> list[str]:
        """The lines for the run's log since the last call."""
        notices, self.notices = self.notices, []
        return notices

    def _first_replay(self, graph: _Graph, sizes: tuple[tuple[int, ...], ...], g_mm: list[list[torch.Tensor]],
                      g_uni: list[list[torch.Tensor]] | None, coeff: torch.Tensor | None, gaussian_noise: bool,
                      gamma: float) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The graph's first replay against the eager shaping of the same gradients, OGM-GE's noise
        drawn from the same generator state: the graph's results where they agree, else the
        eager ones."""
        device = g_mm[0][0].device
        drawn_from = generator_state(device)
        graph.replay()
        got_flats, got_cos = graph.outputs(sizes)
        with drawing_from(drawn_from, device):
            want_flats, want_cos = shape_groups(g_mm, g_uni, coeff, gaussian_noise, gamma)
        why = None if got_cos is None else _cosine_mismatch(got_cos, want_cos, sizes)
        if why is None and got_cos is not None and ((got_cos > 0) != (want_cos > 0)).any().item():
            # A cosine within rounding of 0: each side chose MMPareto's weights by its own
            # rounding, and their gradients cannot be compared. The next replay is checked.
            return want_flats, want_cos
        why = why or _gradient_mismatch(got_flats, want_flats, sizes)
        if why is not None:
            self._fall_back(f"the first replay of its graph: {why}")
            return want_flats, want_cos
        graph.checked = True
        return got_flats, got_cos

    def _fall_back(self, reason: str) -> None:
        self.eager_because = reason
        self.notices.append(fallback_notice(self.PART, reason))
        self.graphs.clear()                  # their memory
        self.pool = self.stream = None

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

        # The per-element tensor ids of each group (utils/dgs/segments.py), from a bounded cache
        # that may drop them later: the graph reads them at every replay. Made here, before the
        # capture, where their host-to-device copy is allowed.
        graph.reads = tuple(segment_ids(group, first.device) for group in sizes)
        graph.replay, self.pool, self.stream = capture(body, first.device, self.pool, self.stream)
        return graph


def _cosine_mismatch(got: torch.Tensor, want: torch.Tensor, sizes: tuple[tuple[int, ...], ...]) -> str | None:
    """Whether the groups' MMPareto cosines differ beyond rounding.

    cos = C / √(A B) from three sums over the group's N elements (C = a·b, A = ‖a‖², B = ‖b‖²,
    `rounding_error_bound`): C is off by at most γ̃(N) Σ|a_i b_i| ≤ γ̃(N) ‖a‖ ‖b‖ (Cauchy–Schwarz),
    A and B by γ̃(N) of themselves, and the product, the root and the quotient round once each:
    cos is off by at most 2γ̃(N) + 3u, whatever the gradients, and two evaluations by twice that.
    """
    for i, group in enumerate(sizes):
        tolerance = 2 * (2 * rounding_error_bound(sum(group)) + 3 * UNIT_ROUNDOFF)
        why = mismatch(f"encoder group {i}'s MMPareto cosine", got[i], want[i], tolerance)
        if why is not None:
            return why
    return None


def _gradient_mismatch(got: list[torch.Tensor], want: list[torch.Tensor], sizes: tuple[tuple[int, ...], ...]
                       ) -> str | None:
    """Whether the shaped gradients differ beyond rounding, tensor by tensor.

    An element of a tensor of n elements in a group of N is a few elementwise operations on its
    two gradients with factors from sums: MMPareto's weight from the group's three sums of N
    terms, the magnitude factor from the tensor's two norms, OGM-GE's noise scale from its
    standard deviation: 3N + 3n terms in all. To first order its error is γ̃(3N + 3n) of the
    size of its terms, taken as the largest element of the eager result's tensor
    (`rounding_tolerance`). Where MMPareto's two gradients nearly cancel in a tensor, the terms
    are larger than the result and the bound too small: the check then errs on the side of
    eager, which costs speed, not correctness.
    """
    for i, (group, got_flat, want_flat) in enumerate(zip(sizes, got, want)):
        for p, (g, w) in enumerate(zip(got_flat.split(group), want_flat.split(group))):
            tolerance = rounding_tolerance(3 * sum(group) + 3 * w.numel(), w.abs().max().item())
            why = mismatch(f"encoder group {i}'s shaped gradient (its tensor {p})", g, w, tolerance)
            if why is not None:
                return why
    return None
