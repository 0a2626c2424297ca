"""Step and epoch time, and peak memory, of plain training vs full DGS.

    python benchmarks/bench_train.py --Dataset IEMOCAP MELD --device cpu [cuda] [--json out.json]

Data: real-size synthetic sets (made once under --data-dir if missing). For each dataset,
device and configuration (plain = `--modulation Normal --no-pareto --no-shapley`, dgs = the
default), it times `--steps` training steps (median) after `--warmup` untimed ones on the same
batches (by default one pass over them: every shape they use is then cached, as in any epoch
after the first: graph structures, the GPU's CUDA graphs), then `--epochs` full epochs (train +
test eval; median, and the first apart), and records peak memory (CPU: peak RSS of the process
so far; CUDA: peak allocated). Profiled steps (--profile-steps) on the first batch count the GFLOP of each
configuration (the same batch for both: their ratio is the machine-independent cost of DGS) and
give the time by phase (encoders, graph, valuation, backward, shaping, optimizer), median and
fastest; the sum of the fastest is the step's floor, an upper bound on its time on a machine
that does not stall. Before and after each configuration, a [1024, 1024] GEMM records how fast
the machine was and a pure-Python loop the share of time it was not running the process.
Then (--paired-rounds) plain and DGS steps alternate on the same batches, each DGS step timed
right after a plain one on its batch: the median of those ratios is the DGS / plain cost on a
machine whose speed drifts between one configuration's run and the next (a shared VM).
Prints a table; --json writes everything.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataloader.datasets import DATASETS, Conversations, DataError, load_conversations  # noqa: E402
from dataloader.loaders import make_loaders  # noqa: E402
from dataloader.synthetic import generate  # noqa: E402
from model.m3net import M3Net  # noqa: E402
from utils.cpu_memory import keep_freed_memory  # noqa: E402
from utils.dgs.step import DGSStep  # noqa: E402
from utils.training.config import METHODS, as_command_line, parse_args  # noqa: E402
from utils.training.main import build_loss, build_model, build_step  # noqa: E402
from utils.training.trainer import evaluate  # noqa: E402

CONFIGS = ("plain", "dgs")          # methods of utils/training/config.py: METHODS, compared step by step
PHASES = ("m3net.encoders", "m3net.graph", "dgs.valuation", "dgs.backward", "dgs.shaping", "dgs.optimizer")


def checked_device(name: str) -> torch.device:
    """The device named on the command line; a bad or absent one ends the benchmark with one line."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        _exit_with(f"--device {name}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        _exit_with(f"--device {name}: no CUDA device here")
    return device


def load_data(dataset: str, root: Path) -> Conversations:
    """The dataset's features under root; unreadable data ends the benchmark with one line."""
    try:
        return load_conversations(dataset, root)
    except DataError as e:
        _exit_with(str(e))


def _exit_with(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def training_flags(dataset: str, method: str, args) -> argparse.Namespace:
    """The training script's flags for `method` at the benchmark's sizes, its defaults the dataset's."""
    argv = [*METHODS[method], "--batch-size", str(args.batch_size), "--num_L", str(args.num_L),
            "--num_K", str(args.num_K), *(["--no-cuda-graphs"] if args.no_cuda_graphs else [])]
    return parse_args(dataset, DATASETS[dataset].train_defaults, argv)


def build(data, loaders: dict, device: torch.device, flags: argparse.Namespace) -> tuple[M3Net, DGSStep, torch.nn.Module]:
    """Model, loss and step as training builds them (utils/training/main.py), seeded alike."""
    torch.manual_seed(0)
    model = build_model(flags, data).to(device)
    loss = build_loss(flags, data, loaders["train"]).to(device)
    return model, build_step(flags, model, loss), loss


def timed_step(step: DGSStep, batch, device: torch.device) -> float:
    """Seconds of one training step on `batch` (already on `device`), the device's work included."""
    sync(device)
    start = time.perf_counter()
    step(batch, modulation_on=True)
    sync(device)
    return time.perf_counter() - start


def time_steps(step: DGSStep, batches: list, device: torch.device, warmup: int, steps: int) -> list[float]:
    """Seconds of `steps` training steps on `batches` (in turn), after `warmup` untimed ones."""
    step.model.train()
    times = [timed_step(step, batches[i % len(batches)].to(device), device) for i in range(warmup + steps)]
    return times[warmup:]


def time_loading(loaders: dict) -> float:
    """Seconds to collate one epoch's train and test batches, no model (part of the epoch time)."""
    start = time.perf_counter()
    for split in ("train", "test"):
        for _ in loaders[split]:
            pass
    return time.perf_counter() - start


def time_epoch(step: DGSStep, loaders: dict, loss, device: torch.device, dataset: str) -> tuple[float, float]:
    """Seconds of one epoch's training loop and of its test evaluation."""
    sync(device)
    start = time.perf_counter()
    step.model.train()
    for batch in loaders["train"]:
        step(batch.to(device, non_blocking=True), modulation_on=True)
    sync(device)
    trained = time.perf_counter()
    evaluate(step.model, loaders["test"], loss, device, dataset)
    sync(device)
    return trained - start, time.perf_counter() - trained


def evaluation_ratios(model: M3Net, loader, loss, device: torch.device, dataset: str, rounds: int) -> list[float]:
    """Time of an evaluation with the held-out diagnostics (unimodal heads, all coalitions) over
    one without, passes of the split alternating, after one untimed pass of each."""
    ratios = []
    for round_ in range(rounds + 1):
        seconds = {}
        for diagnostics in ((False, True) if round_ % 2 else (True, False)):
            sync(device)
            start = time.perf_counter()
            evaluate(model, loader, loss, device, dataset, diagnostics=diagnostics)
            sync(device)
            seconds[diagnostics] = time.perf_counter() - start
        if round_ > 0:
            ratios.append(seconds[True] / seconds[False])
    return ratios


def paired_ratios(steps: dict[str, DGSStep], batches: list, device: torch.device, rounds: int) -> list[float]:
    """DGS / plain time of steps on the same batch, one right after the other: `rounds` passes
    over `batches` after one untimed pass (the order plain, DGS alternates by round)."""
    ratios = []
    for step in steps.values():
        step.model.train()
    for round_ in range(rounds + 1):
        for batch in batches:
            batch = batch.to(device)
            seconds = {name: timed_step(steps[name], batch, device)
                       for name in (("plain", "dgs") if round_ % 2 else ("dgs", "plain"))}
            if round_ > 0:
                ratios.append(seconds["dgs"] / seconds["plain"])
    return ratios


def profile_steps(step: DGSStep, batch, device: torch.device, repeats: int = 3
                  ) -> tuple[dict[str, float], dict[str, float], float]:
    """`repeats` profiled steps on one batch: milliseconds per phase, median and minimum over the
    steps (device time on CUDA, CPU time otherwise); then one more step for the GFLOP of its
    matrix products (what the profiler counts: mm, bmm, addmm, baddbmm...). Apart, because
    counting FLOPs slows the CPU's ops several-fold (the coalition passes tenfold)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    step.model.train()
    batch = batch.to(device)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(repeats):
            step(batch, modulation_on=True)
            sync(device)
    per_phase = {}
    for event in prof.events():
        if event.name in PHASES:
            # On CUDA the annotation's GPU span, when the profiler reports one; host time otherwise.
            device_us = getattr(event, "device_time_total", 0) if device.type == "cuda" else 0
            per_phase.setdefault(event.name, []).append((device_us or event.cpu_time_total) / 1000)
    with torch.profiler.profile(activities=activities, with_flops=True) as prof:
        step(batch, modulation_on=True)
        sync(device)
    flops = sum(event.flops or 0 for event in prof.events())
    median = {k: statistics.median(v) for k, v in per_phase.items()}
    return median, {k: min(v) for k, v in per_phase.items()}, flops / 1e9


def stall_share(seconds: float = 3.0) -> float:
    """Share of `seconds` that a fixed pure-Python loop (no memory traffic) spends in iterations
    over 5x its median: time the machine did not run this process (a busy or throttled VM).
    NaN for 0 seconds (not measured)."""
    if seconds <= 0:
        return float("nan")
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        sum(i * i for i in range(5000))
        times.append(time.perf_counter() - start)
    slow = 5 * statistics.median(times)
    return sum(t for t in times if t > slow) / sum(times)


def gemm_gflops(device: torch.device, size: int = 1024, repeats: int = 7) -> float:
    """Median GFLOP/s of a float32 [size, size] product now: how fast this machine is at the moment
    (shared VMs swing several-fold from one minute to the next)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--Dataset", nargs="+", default=["IEMOCAP", "MELD"], choices=["IEMOCAP", "MELD"])
    p.add_argument("--device", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    p.add_argument("--data-dir", default="data/bench", help="real-size synthetic data (generated if missing)")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num_L", type=int, default=1)
    p.add_argument("--num_K", type=int, default=1)
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first, on the timed batches (default: one pass over them)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--epochs", type=int, default=1, help="timed full epochs per configuration (median; 0: none)")
    p.add_argument("--profile-steps", type=int, default=3, help="profiled steps (phase medians and floors)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(METHODS))
    p.add_argument("--paired-rounds", type=int, default=2,
                   help="rounds of plain and DGS steps alternating on the --steps batches (0: none)")
    p.add_argument("--eval-rounds", type=int, default=4,
                   help="test evaluations with and without the held-out diagnostics, alternating (0: none)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="the context RNN and the gradient shaping eagerly on the GPU")
    p.add_argument("--stall-seconds", type=float, default=3.0,
                   help="length of the stall probe before and after each configuration (0: none)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    keep_freed_memory()

    devices = [checked_device(name) for name in args.device]
    results, paired, evaluations = [], [], []
    for dataset in args.Dataset:
        root = Path(args.data_dir) / dataset
        if not (root / f"{dataset}_features").is_dir():
            print(f"generating synthetic {dataset} (scale {args.scale}) in {root}", flush=True)
            generate(dataset, root, scale=args.scale, seed=0)
        data = load_data(dataset, root)
        loaders = make_loaders(data, args.batch_size, seed=0, pin_memory=any(d.type == "cuda" for d in devices))
        batches = list(loaders["train"])[: args.steps]
        warmup = len(batches) if args.warmup is None else args.warmup
        loading_s = time_loading(loaders)
        for device_name, device in zip(args.device, devices):
            for name in args.configs:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                flags = training_flags(dataset, name, args)
                model, step, loss = build(data, loaders, device, flags)
                gemm_before, stalls_before = gemm_gflops(device), stall_share(args.stall_seconds)
                step_times = time_steps(step, batches, device, warmup, args.steps)
                epoch_times = [sum(time_epoch(step, loaders, loss, device, dataset)) for _ in range(args.epochs)]
                peak_mib = peak_memory_mib(device)          # before the profiler adds its own
                phases, phase_floor, gflop = profile_steps(step, batches[0], device, args.profile_steps)
                row = {"dataset": dataset, "device": device_name, "config": name,
                       "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
                       "step_s_median": statistics.median(step_times),
                       "epoch_s_median": statistics.median(epoch_times) if epoch_times else float("nan"),
                       "first_epoch_s": epoch_times[0] if epoch_times else float("nan"),
                       "peak_mem_mib": peak_mib, "loading_s": loading_s,
                       "step_gflop": gflop, "gemm_gflops": [gemm_before, gemm_gflops(device)],
                       "stall_share": [stalls_before, stall_share(args.stall_seconds)],
                       "breakdown_ms": phases, "breakdown_min_ms": phase_floor,
                       "floor_s": sum(phase_floor.values()) / 1000,
                       "flags": as_command_line(flags),
                       "step_times": step_times, "epoch_times": epoch_times}
                results.append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("step_times", "epoch_times")}), flush=True)
                del model, step
            if args.paired_rounds and set(CONFIGS) <= set(args.configs):
                steps = {name: build(data, loaders, device, training_flags(dataset, name, args))[1] for name in CONFIGS}
                ratios = paired_ratios(steps, batches, device, args.paired_rounds)
                del steps
                paired.append({"dataset": dataset, "device": device_name, "ratio_median": statistics.median(ratios),
                               "ratios": ratios})
            if args.eval_rounds:
                model, _, loss = build(data, loaders, device, training_flags(dataset, "dgs", args))
                ratios = evaluation_ratios(model, loaders["test"], loss, device, dataset, args.eval_rounds)
                evaluations.append({"dataset": dataset, "device": device_name,
                                    "ratio_median": statistics.median(ratios), "ratios": ratios})
                del model

    print()
    print(f"{'dataset':8} {'device':6} {'config':6} {'step s':>8} {'floor s':>8} {'epoch s':>8} {'load s':>7} "
          f"{'1st ep s':>8} {'peak MiB':>9} {'GFLOP':>7} {'GEMM GF/s':>10} {'stalled':>9}  dgs/plain (time, floor, GFLOP)")
    for row in results:
        plain = next(r for r in results if r["dataset"] == row["dataset"] and r["device"] == row["device"]
                     and r["config"] == "plain") if "plain" in args.configs else None
        ratio = (f"{row['step_s_median'] / plain['step_s_median']:.2f}x, {row['floor_s'] / plain['floor_s']:.2f}x, "
                 f"{row['step_gflop'] / plain['step_gflop']:.2f}x" if plain and row["config"] == "dgs" else "")
        gemm = "-".join(f"{g:.0f}" for g in row["gemm_gflops"])
        stalled = "-".join(f"{100 * g:.0f}%" for g in row["stall_share"])
        print(f"{row['dataset']:8} {row['device']:6} {row['config']:6} {row['step_s_median']:8.3f} "
              f"{row['floor_s']:8.3f} {row['epoch_s_median']:8.2f} {row['loading_s']:7.2f} {row['first_epoch_s']:8.2f} "
              f"{row['peak_mem_mib']:9.0f} "
              f"{row['step_gflop']:7.1f} {gemm:>10} {stalled:>9}  {ratio}")
    for row in results:
        for key, what in (("breakdown_ms", "median"), ("breakdown_min_ms", "fastest")):
            parts = ", ".join(f"{k.split('.')[1]} {v:.0f}" for k, v in row[key].items())
            print(f"{row['config']} step by phase (ms, {what} of {args.profile_steps}) {row['dataset']} {row['device']}: {parts}")
    for row in paired:
        print(f"DGS / plain, paired steps on the same batches, {row['dataset']} {row['device']}: "
              f"{row['ratio_median']:.2f}x (median of {len(row['ratios'])}; "
              f"{min(row['ratios']):.2f}-{max(row['ratios']):.2f}x)")
    for row in evaluations:
        print(f"test evaluation with / without the held-out diagnostics, {row['dataset']} {row['device']}: "
              f"{row['ratio_median']:.2f}x (median of {len(row['ratios'])})")
    if args.json:
        Path(args.json).write_text(json.dumps({"configurations": results, "paired": paired,
                                               "evaluation": evaluations}, indent=1))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" x{torch.get_num_threads()} threads"
    except OSError:
        pass
    return "cpu"


if __name__ == "__main__":
    main()
