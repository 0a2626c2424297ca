"""The shared entry point of run/train_OGM_Shapley_MMPareto_<DATASET>.py."""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dataloader.datasets import Conversations, DataError, load_conversations
from dataloader.loaders import make_loaders
from model.checkpoint import load_model_state, read_checkpoint
from model.m3net import M3Net, ModelConfig
from utils.config import parse_args
from utils.cpu_memory import keep_freed_memory
from utils.dgs import DGSSettings, DGSStep, make_optimizer
from utils.errors import UserError
from utils.losses import inverse_prior_weights, multimodal_loss
from utils.runlog import RunLog, write_json
from utils.trainer import Trainer, TrainingDiverged, evaluate

REPO = Path(__file__).resolve().parents[1]


def main(dataset: str, defaults: dict[str, Any], argv: Sequence[str] | None = None) -> None:
    """Parse flags, then train or test. User errors: one line on stderr, exit status 2."""
    keep_freed_memory()
    try:
        args = parse_args(dataset, defaults, argv)
        if args.testing:
            test(args)
        else:
            train(args)
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


# ---------------------------------------------------------------------- set-up
def resolve_data_dir(args: argparse.Namespace) -> Path:
    """--data-dir, else the current directory, else the repo's data/ (first holding <Dataset>_features)."""
    if args.data_dir:
        return Path(args.data_dir)
    folder = f"{args.Dataset}_features"
    for candidate in (Path.cwd(), REPO / "data"):
        if (candidate / folder).is_dir():
            return candidate
    raise UserError(f"no {folder}/ in the current directory or in {REPO / 'data'}: pass --data-dir, or make "
                    f"synthetic features with: python -m dataloader.synthetic --Dataset {args.Dataset} --out {REPO / 'data'}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(args: argparse.Namespace) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not args.no_cuda else "cpu")


def build_model(args: argparse.Namespace, data: Conversations) -> M3Net:
    cfg = ModelConfig(
        n_classes=data.n_classes, n_speakers=data.n_speakers, audio_dim=data.dims["audio"],
        visual_dim=data.dims["visual"], modals=args.modals, base_model=args.base_model, norm=args.norm,
        num_L=args.num_L, num_K=args.num_K, use_speaker=args.use_speaker, use_modal=args.use_modal,
        use_residue=args.use_residue, av_using_lstm=args.av_using_lstm, dropout=args.dropout)
    return M3Net(cfg)


def class_weights(args: argparse.Namespace, data: Conversations, train_loader) -> torch.Tensor | None:
    """IEMOCAP's NLL weights: 1 / class prior of the dialogues actually trained on."""
    if args.Dataset != "IEMOCAP" or not args.class_weight:
        return None
    labels = torch.from_numpy(np.concatenate([d.labels for d in train_loader.dataset.dialogues]))
    return inverse_prior_weights(labels, data.n_classes)


def default_log_dir(args: argparse.Namespace) -> Path:
    return Path(args.log_dir or f"runs/{args.Dataset}-{time.strftime('%Y%m%d-%H%M%S')}")


def load_weights(model: M3Net, path: str, log: RunLog) -> None:
    fresh = load_model_state(model, read_checkpoint(path)["model"])
    log.line(f"loaded weights from {path}" + (f"; initialised {', '.join(fresh)}" if fresh else ""))


def setup(args: argparse.Namespace) -> tuple[Conversations, dict, M3Net, torch.nn.Module, torch.device, RunLog]:
    device = pick_device(args)
    data = load_conversations(args.Dataset, resolve_data_dir(args))
    seed_everything(args.seed)
    try:
        loaders = make_loaders(data, args.batch_size, valid_frac=args.valid, seed=args.seed,
                               num_workers=args.num_workers, pin_memory=device.type == "cuda")
    except ValueError as e:   # e.g. --valid leaves no train dialogue
        raise UserError(f"--valid {args.valid}: {e}") from None
    model = build_model(args, data).to(device)
    loss_mm = multimodal_loss(args.Dataset, class_weights(args, data, loaders["train"])).to(device)
    log = RunLog(default_log_dir(args), tensorboard=args.tensorboard and not args.testing)
    return data, loaders, model, loss_mm, device, log


# ---------------------------------------------------------------------- train / test
def train(args: argparse.Namespace) -> None:
    if args.resume:
        args = resumed_args(args)
    elif args.log_dir and (Path(args.log_dir) / "metrics.jsonl").exists():
        raise UserError(f"--log-dir {args.log_dir} already holds a run: add --resume to continue it, or pick another folder")
    data, loaders, model, loss_mm, device, log = setup(args)
    splits = ", ".join(f"{name} {len(loader.dataset)} dialogues" for name, loader in loaders.items())
    log.line(f"{args.Dataset}: {splits}; on {device}; log dir {log.dir}")
    log.line("flags: " + " ".join(f"--{k}={v}" for k, v in sorted(vars(args).items())))
    if args.checkpoint:
        load_weights(model, args.checkpoint, log)
    optimizer = make_optimizer(model, args.lr, args.l2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_decay_step, gamma=args.lr_decay_ratio)
    settings = DGSSettings(pareto=not args.no_pareto, shapley=not args.no_shapley, modulation=args.modulation,
                           alpha=args.alpha_, pareto_gamma=args.pareto_gamma)
    step = DGSStep(model, optimizer, loss_mm, settings)
    trainer = Trainer(args, model, step, scheduler, loaders, loss_mm, device, log, list(data.class_names))
    if args.resume:
        trainer.resume(log.dir / "last.pt")
    try:
        trainer.fit()
    finally:
        log.close()


def resumed_args(args: argparse.Namespace) -> argparse.Namespace:
    """The saved flags of the run in --log-dir; --epochs, --no-cuda and --num-workers may change."""
    last = Path(args.log_dir) / "last.pt"
    if not last.is_file():
        raise UserError(f"--resume: {last} does not exist")
    saved = argparse.Namespace(**read_checkpoint(last)["args"])
    for name in ("epochs", "no_cuda", "num_workers", "log_dir", "resume"):
        setattr(saved, name, getattr(args, name))
    return saved


def test(args: argparse.Namespace) -> None:
    data, loaders, model, loss_mm, device, log = setup(args)
    load_weights(model, args.checkpoint, log)
    result = evaluate(model, loaders["test"], loss_mm, device, args.Dataset)
    metrics = {k: result[k] for k in ("acc", "weighted_f1", "macro_f1", "micro_f1")}
    metrics["n_utterances"] = int(result["labels"].size)
    metrics["predictions"] = result["preds"].astype(int).tolist()
    write_json(log.dir / "test_metrics.json", metrics)
    log.line(f"test: acc {metrics['acc']:.2f} weighted F1 {metrics['weighted_f1']:.2f} macro F1 "
             f"{metrics['macro_f1']:.2f} micro F1 {metrics['micro_f1']:.2f} on {metrics['n_utterances']} "
             f"utterances; written to {log.dir / 'test_metrics.json'}")
    log.close()
