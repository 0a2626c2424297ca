"""Time of the gradient shaping alone (MMPareto + OGM-GE on every encoder group), at M3Net's real
parameter sizes: as a training step runs it (on the CPU, `utils/dgs/shaping.py`'s per-tensor
implementation; on the GPU, the flat one replayed from a CUDA graph, `utils/dgs/shaping_graph.py`),
the flat implementation run eagerly on the same device, and the text group's noise draw against
a plain `torch.randn`.

    python benchmarks/bench_shaping.py [--Dataset IEMOCAP MELD] [--device cpu cuda] [--repeats 25]

No data is read: the gradients are random tensors shaped like the parameters (the text encoder
alone has 10.5M). Each measurement is short, so the fastest of `--repeats` is a fair figure even
on a VM that stalls; the median is printed beside it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_train import checked_device, sync  # noqa: E402
from dataloader.datasets import DATASETS, VISUAL_DIM  # noqa: E402
from model.m3net import M3Net, ModelConfig  # noqa: E402
from utils.cpu_memory import keep_freed_memory  # noqa: E402
from utils.dgs.noise import standard_normal_like  # noqa: E402
from utils.dgs.shaping import shape_group_flat  # noqa: E402
from utils.dgs.step import DGSSettings, DGSStep, make_optimizer  # noqa: E402


def timed_ms(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """(fastest, median) milliseconds of `fn()` over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return min(times), statistics.median(times)


def bench(dataset: str, device: torch.device, repeats: int) -> dict:
    info = DATASETS[dataset]
    cfg = ModelConfig(n_classes=len(info.class_names), n_speakers=info.n_speakers, audio_dim=info.audio_dim,
                      visual_dim=VISUAL_DIM)
    model = M3Net(cfg).to(device)
    step = DGSStep(model, make_optimizer(model, 1e-4, 0.0), torch.nn.NLLLoss(), DGSSettings())
    torch.manual_seed(0)
    g_mm = {id(p): torch.randn_like(p) for p in step.params}
    g_uni = {id(p): torch.randn_like(p) for p in step.unimodal_params}
    coeff = torch.tensor([0.6, 1.0, 1.0][: len(step.modalities)], device=device)
    text = torch.empty(sum(step.group_sizes["l"]), device=device)
    row = {"dataset": dataset, "device": str(device), "encoder_params": sum(map(sum, step.group_sizes.values()))}

    def flat_shaping() -> None:
        for i, m in enumerate(step.modalities):
            group = step.groups[m]
            shape_group_flat([g_mm[id(p)] for p in group], [g_uni[id(p)] for p in group], coeff[i], True, 1.0)

    for name, fn in (("shaping_ms", lambda: step.shape(dict(g_mm), g_uni, coeff)),
                     ("flat_shaping_ms", flat_shaping),
                     ("text_noise_ms", lambda: standard_normal_like(text)),
                     ("text_randn_ms", lambda: torch.randn_like(text))):
        row[name] = timed_ms(fn, device, repeats)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--Dataset", nargs="+", default=["IEMOCAP", "MELD"], choices=sorted(DATASETS))
    p.add_argument("--device", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    p.add_argument("--repeats", type=int, default=25)
    args = p.parse_args()
    devices = [checked_device(name) for name in args.device]
    keep_freed_memory()
    keys = ("shaping_ms", "flat_shaping_ms", "text_noise_ms", "text_randn_ms")
    print(f"{'dataset':8} {'device':6} {'encoder params':>14}  {'shaping ms':>16}  {'flat shaping ms':>16}  "
          f"{'text noise ms':>16}  {'torch.randn ms':>16}   (fastest / median of {args.repeats})")
    for dataset in args.Dataset:
        for device in devices:
            r = bench(dataset, device, args.repeats)
            cells = "  ".join(f"{r[k][0]:7.1f} / {r[k][1]:6.1f}" for k in keys)
            print(f"{dataset:8} {device.type:6} {r['encoder_params']:14,d}  {cells}", flush=True)


if __name__ == "__main__":
    main()
