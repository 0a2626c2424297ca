"""Capturing work into CUDA graphs, and deciding when a replay may stand for the eager
computation: the float32 rounding bounds a first replay is checked against, the log line of a
fall-back, the random state a check replays. Used by the context RNN's graphs
(`model/cuda_graphs.py`) and the DGS step's shaping graphs (`utils/dgs/shaping_graph.py`)."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from utils import errors

WARMUP_RUNS = 2   # eager runs on the capture stream before capturing: cuDNN sets up its plans


class CudaGraphError(RuntimeError):
    """A CUDA graph capture failed; the message says how to train without the graphs."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name if it has none); for a
    CudaGraphError, of the error that failed the capture."""
    if isinstance(error, CudaGraphError) and error.__cause__ is not None:
        error = error.__cause__
    return errors.first_line(error)


@contextlib.contextmanager
def capturing(graph: torch.cuda.CUDAGraph, pool: tuple) -> Iterator[None]:
    """Capture the current stream's work into `graph`, ended even if the work raises (an
    unended capture would break every later call on the stream). thread_local: a DataLoader's
    pin-memory thread may call CUDA meanwhile. A failure is re-raised as CudaGraphError."""
    try:
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            yield
        except BaseException:
            # After a failed op CUDA has invalidated the capture, and ending it raises too, only
            # to say so: the op's error is the one to report.
            with contextlib.suppress(Exception):
                graph.capture_end()
            raise
        graph.capture_end()
    except Exception as e:
        raise CudaGraphError(f"capturing a CUDA graph failed ({first_line(e)}); --no-cuda-graphs trains without "
                             f"them") from e


UNIT_ROUNDOFF = 2.0 ** -24      # u of float32: a rounding is within u of its exact result, relatively


def rounding_error_bound(terms: int) -> float:
    """γ̃(n): how far a float32 sum of n terms may be from the exact sum, as a fraction of the sum
    of the terms' magnitudes Σ|t_i|.

    In any order of summation, at most γ_n = nu / (1 − nu) (Higham, Accuracy and Stability of
    Numerical Algorithms, 2nd ed., §4.2), reached only by roundings that all err the same way:
    for the ten million terms of the text encoder's gradient that is 1.7, no bound at all. With the
    roundings modelled as independent and of mean zero, Higham & Mary (SIAM J. Sci. Comput.
    41(5), 2019, Theorem 3.1) bound the error by exp(λ√n u + nu²/(1 − u)) − 1 ≈ λ√n u, except
    with probability at most 2n·exp(−λ²(1 − u)²/2); λ is taken so that this probability is u
    itself. The smaller of the two bounds.

    The first-replay checks compare two float32 evaluations of the same arithmetic on the same
    inputs: they differ only where a sum is taken in another order (another algorithm, a split
    that depends on alignment, atomics), each within γ̃(n) of the exact value; so by at most
    `rounding_tolerance`, 2·γ̃(n)·Σ|t_i|, to first order.
    """
    u = UNIT_ROUNDOFF
    worst_case = terms * u / (1 - terms * u) if terms * u < 1 else math.inf
    lam = math.sqrt(2 * math.log(2 * terms / u)) / (1 - u)
    return min(worst_case, math.expm1(lam * math.sqrt(terms) * u + terms * u * u / (1 - u)))


def rounding_tolerance(terms: int, magnitude: float) -> float:
    """The largest difference that float32 rounding explains between two evaluations of a result
    summed from `terms` terms whose magnitudes add up to at most `magnitude`
    (`rounding_error_bound`)."""
    return 2 * rounding_error_bound(terms) * magnitude


def mismatch(what: str, got: torch.Tensor, want: torch.Tensor, tolerance: float) -> str | None:
    """None where `got` is `want` to within `tolerance`, element by element; else what differs,
    by how much, for the run's log."""
    difference = torch.where(got == want, 0.0, (got - want).abs())      # equal infinities agree
    worst = difference.max().item()
    if worst <= tolerance:
        return None
    return f"{what} differs from the eager one by up to {worst:.3g}, above its float32 rounding bound {tolerance:.3g}"


def fallback_notice(part: str, reason: str) -> str:
    """The run log's line for `part` going back to eager."""
    return f"CUDA graphs off for {part}: {reason}; it runs eagerly for the rest of the run"


def generator_state(device: torch.device) -> torch.Tensor:
    """The state of torch's generator of `device` (what dropout and OGM-GE's noise draw from)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


@contextlib.contextmanager
def drawing_from(state: torch.Tensor, device: torch.device) -> Iterator[None]:
    """Run the block with `device`'s generator set to `state`; after it, the generator is where
    it was before: the eager computation of a check draws what the replay drew, and the run
    goes on from the replay's draws."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        yield
