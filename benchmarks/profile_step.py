"""Where one training step's time goes: per phase, host time, kernel launches and GPU time.

    python benchmarks/profile_step.py --Dataset MELD --device cuda [--config dgs] [--trace t.json] [--epoch]

On a GPU a step is bound by the host when its kernels keep the GPU busy for less time than the
step takes: then the launches (and the Python and dispatcher work behind each) set the speed,
and fewer, larger kernels are what helps. Prints, per phase, the host (CPU) milliseconds, the
kernels launched and their GPU milliseconds, then the ops with the most host time. With --epoch,
also one whole epoch (train + test evaluation) timed in parts and under cProfile: the Python
functions where an epoch's host time goes, beyond the steps themselves.
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import PHASES, build, checked_device, load_data, sync, time_epoch, training_flags  # noqa: E402
from dataloader.loaders import make_loaders  # noqa: E402
from utils.cpu_memory import keep_freed_memory  # noqa: E402
from utils.training.config import METHODS  # noqa: E402

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def phase_of(event) -> str:
    """The innermost step phase (record_function range) an event ran in; backward ops run on
    autograd's own thread, outside the ranges, and count as 'backward'."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in PHASES:
            return parent.name.split(".")[1]
        if parent.name.startswith("autograd::engine"):
            return "backward"
        parent = parent.cpu_parent
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--Dataset", default="MELD", choices=["IEMOCAP", "MELD"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-dir", default="data/bench")
    p.add_argument("--config", default="dgs", choices=list(METHODS))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num_L", type=int, default=1)
    p.add_argument("--num_K", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="profiled steps (on different batches)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="the context RNN and the gradient shaping eagerly on the GPU")
    p.add_argument("--trace", default=None, help="write a Chrome trace here")
    p.add_argument("--epoch", action="store_true", help="also profile a whole epoch (cProfile)")
    args = p.parse_args()
    keep_freed_memory()                  # as training and bench_train.py run: no page faults per step

    device = checked_device(args.device)
    data = load_data(args.Dataset, Path(args.data_dir) / args.Dataset)
    loaders = make_loaders(data, args.batch_size, seed=0, pin_memory=device.type == "cuda")
    batches = [b.to(device) for b in list(loaders["train"])[: args.steps]]
    model, step, _ = build(data, loaders, device, training_flags(args.Dataset, args.config, args))
    model.train()
    for batch in batches:        # warm-up on the same batches: allocator, graph cache, CUDA graphs
        step(batch, modulation_on=True)
    sync(device)
    start = time.perf_counter()
    for batch in batches[: args.steps]:
        step(batch, modulation_on=True)
    sync(device)
    wall_ms = (time.perf_counter() - start) / args.steps * 1000

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for batch in batches[: args.steps]:
            step(batch, modulation_on=True)
        sync(device)
    if args.trace:
        prof.export_chrome_trace(args.trace)

    host_ms, launches = collections.Counter(), collections.Counter()
    for event in prof.events():
        if event.name in PHASES:
            host_ms[event.name.split(".")[1]] += event.cpu_time_total / 1000 / args.steps
        if event.name in LAUNCHES:
            launches[phase_of(event)] += 1 / args.steps
    # Kernels, copies and memsets; the phase ranges also appear on the GPU's timeline, as spans.
    gpu_ms = sum(event.device_time for event in prof.events()
                 if event.device_type == torch.autograd.DeviceType.CUDA
                 and not event.is_user_annotation and event.name not in PHASES) / 1000 / args.steps
    print(f"{args.Dataset} {args.config} on {args.device}: {wall_ms:.1f} ms per step unprofiled, "
          f"{sum(launches.values()):.0f} kernel launches, GPU busy {gpu_ms:.1f} ms")
    for phase in [p.split(".")[1] for p in PHASES] + ["other"]:
        print(f"  {phase:10} host {host_ms[phase]:7.1f} ms   launches {launches[phase]:6.0f}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    if device.type == "cuda":
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.top))
    if args.epoch:
        profile_epoch(step, loaders, data.dataset, device, args.top)


def profile_epoch(step, loaders: dict, dataset: str, device: torch.device, top: int) -> None:
    """One warm epoch timed (train loop, test evaluation), then one under cProfile."""
    loss = step.loss_mm
    time_epoch(step, loaders, loss, device, dataset)                    # warm: every shape seen once
    train_s, eval_s = time_epoch(step, loaders, loss, device, dataset)
    print(f"epoch: {train_s + eval_s:.2f} s = train {train_s:.2f} s ({len(loaders['train'])} steps, "
          f"{train_s / len(loaders['train']) * 1000:.1f} ms each) + test evaluation {eval_s:.2f} s "
          f"({len(loaders['test'])} batches)")
    if device.type == "cuda":
        stats = torch.cuda.memory_stats()
        print(f"cudaMalloc calls so far {stats.get('num_device_alloc')}, frees {stats.get('num_device_free')}, "
              f"allocator retries {stats.get('num_alloc_retries')}")
    profiler = cProfile.Profile()
    profiler.enable()
    time_epoch(step, loaders, loss, device, dataset)
    profiler.disable()
    for order in ("cumulative", "tottime"):
        pstats.Stats(profiler).sort_stats(order).print_stats(top)


if __name__ == "__main__":
    main()
