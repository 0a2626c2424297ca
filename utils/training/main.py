"""The shared entry point of run/train_OGM_Shapley_MMPareto_<DATASET>.py."""
from __future__ import annotations

import argparse
import json
import math
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dataloader.datasets import DATASETS, Conversations, DataError, find_data_dir, load_conversations
from dataloader.loaders import make_loaders
from model.checkpoint import load_model_state, read_checkpoint
from model.graph import GraphCapacityError, check_capacity
from model.m3net import M3Net, ModelConfig
from utils.cpu_memory import keep_freed_memory
from utils.dgs.step import DGSSettings, DGSStep, make_optimizer
from utils.errors import UserError
from utils.files import equal_as_json, write_json
from utils.signals import raise_if_stopped, stop_signals_raise
from utils.training.config import (ARCHITECTURE_FLAGS, UNSEEN_IN_KEYS, architecture_differences, as_command_line,
                                   flag_default, flag_name, given_flags, parse_args)
from utils.training.losses import inverse_prior_weights, multimodal_loss
from utils.training.runlog import METRICS_FILE, RunLog, check_not_in_use, read_records
from utils.training.trainer import Trainer, TrainerSettings, TrainingDiverged, evaluate


def main(dataset: str, defaults: dict[str, Any], argv: Sequence[str] | None = None) -> None:
    """Parse flags, then train or test. User errors: one line on stderr, exit status 2; Ctrl-C and
    SIGTERM: one line, exit status 128 + the signal's number (130, 143)."""
    keep_freed_memory()
    with stop_signals_raise():
        try:
            args = parse_args(dataset, defaults, argv)
            if args.testing:
                test(args)
            else:
                train(args, given_flags(dataset, defaults, argv) if args.resume else set())
        except (UserError, DataError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except TrainingDiverged as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt as e:
            signum = _signal_of(e)
            print(_interrupted(getattr(e, "log_dir", None), signum), file=sys.stderr)
            sys.exit(128 + signum)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a training run, whose log dir is known."""

    def __init__(self, log_dir: Path, signum: int):
        super().__init__(str(log_dir))
        self.log_dir, self.signum = log_dir, signum


def _signal_of(interrupt: KeyboardInterrupt) -> int:
    """The signal that stopped the run (a KeyboardInterrupt raised otherwise counts as Ctrl-C)."""
    return getattr(interrupt, "signum", signal.SIGINT)


def _interrupted(log_dir: Path | None, signum: int = signal.SIGINT) -> str:
    stopped = "interrupted" if signum == signal.SIGINT else f"terminated by {signal.Signals(signum).name}"
    if log_dir is None:
        return (f"{stopped} (a training run keeps its last finished epoch in <log dir>/last.pt: continue it "
                f"with --resume --log-dir <log dir>)")
    if not (log_dir / "last.pt").is_file():
        return f"{stopped} in the first epoch: nothing saved to continue from; remove {log_dir} before reusing it"
    return (f"{stopped} ({log_dir / 'last.pt'} keeps the last finished epoch: continue it with --resume "
            f"--log-dir {log_dir})")


# ---------------------------------------------------------------------- set-up
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
        use_residue=args.use_residue, av_using_lstm=args.av_using_lstm, text_linear=args.text_linear,
        dropout=args.dropout)
    model = M3Net(cfg)
    model.cuda_graphs = not args.no_cuda_graphs
    return model


def class_weights(args: argparse.Namespace, data: Conversations, train_loader) -> torch.Tensor | None:
    """The NLL loss's weights (IEMOCAP's): 1 / class prior of the dialogues actually trained on."""
    if data.info.loss != "nll" or not args.class_weight:
        return None
    labels = torch.from_numpy(np.concatenate([d.labels for d in train_loader.dataset.dialogues]))
    return inverse_prior_weights(labels, data.n_classes)


def build_loss(args: argparse.Namespace, data: Conversations, train_loader) -> torch.nn.Module:
    """The multimodal loss L_mm of the dataset."""
    return multimodal_loss(data.info.loss, class_weights(args, data, train_loader))


def build_step(args: argparse.Namespace, model: M3Net, loss_mm: torch.nn.Module) -> DGSStep:
    """The training step of the flags (its optimizer included), for training, benchmarks and tools."""
    optimizer = make_optimizer(model, args.lr, args.l2)
    settings = DGSSettings(pareto=not args.no_pareto, shapley=not args.no_shapley, modulation=args.modulation,
                           alpha=args.alpha_, pareto_gamma=args.pareto_gamma,
                           unimodal_loss=not args.no_unimodal_loss,
                           modulation_epochs=(args.modulation_starts, args.modulation_ends))
    return DGSStep(model, optimizer, loss_mm, settings)


def load_weights(model: M3Net, path: str, args: argparse.Namespace) -> str:
    """Load --checkpoint into `model`; returns the line to log. Our checkpoints also carry the
    flags they were trained with: a different architecture flag is an error, not a quiet change
    of predictions."""
    checkpoint = read_checkpoint(path)
    saved_flags = checkpoint.get("args", {})       # none in a raw M3Net state_dict
    trained_on = saved_flags.get("Dataset") or _dataset_of_classifier(checkpoint["model"]) or args.Dataset
    if trained_on != args.Dataset:
        how = "was trained on" if "Dataset" in saved_flags else "has the classifier of"
        raise UserError(f"checkpoint {path} {how} {trained_on}: use "
                        f"run/train_OGM_Shapley_MMPareto_{trained_on}.py with {trained_on} data")
    theirs, ours = architecture_differences(saved_flags, args)
    if theirs:
        raise UserError(f"checkpoint {path} was trained with {' '.join(theirs)}, this run has "
                        f"{' '.join(ours)}: give the checkpoint's flags")
    fresh = load_model_state(model, checkpoint["model"])
    line = f"loaded weights from {path}" + (f"; initialised {', '.join(fresh)}" if fresh else "")
    if not saved_flags:
        line += (f"; a raw state_dict does not tell {as_command_line(args, UNSEEN_IN_KEYS)} from other values of "
                 f"these flags: they must be those it was trained with")
    return line


def _dataset_of_classifier(state: dict[str, torch.Tensor]) -> str | None:
    """The dataset whose class count the state_dict's classifier (smax_fc) has, if exactly one."""
    weight = state.get("smax_fc.weight")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    matching = [name for name, info in DATASETS.items() if len(info.class_names) == weight.shape[0]]
    return matching[0] if len(matching) == 1 else None


def check_batches_fit(loaders: dict, batch_size: int, n_modalities: int) -> None:
    """Fail now rather than hours in: every evaluation batch, and the largest train batch a shuffle
    can draw (the `batch_size` longest dialogues), must fit M3Net's weight tables. The error names
    the largest batch size that fits."""
    try:
        _check_batches(loaders, batch_size, n_modalities)
    except GraphCapacityError as e:
        fitting = next((b for b in range(batch_size - 1, 0, -1) if _batches_fit(loaders, b, n_modalities)), None)
        hint = (f"the largest that fits this data is --batch-size {fitting}" if fitting
                else "no batch size fits: one dialogue alone is too long")
        raise GraphCapacityError(f"{e}; {hint}") from None


def _batches_fit(loaders: dict, batch_size: int, n_modalities: int) -> bool:
    try:
        _check_batches(loaders, batch_size, n_modalities)
    except GraphCapacityError:
        return False
    return True


def _check_batches(loaders: dict, batch_size: int, n_modalities: int) -> None:
    for name, loader in loaders.items():
        lengths = [len(d) for d in loader.dataset.dialogues]
        if name == "train":
            check_capacity(tuple(sorted(lengths)[-batch_size:]), n_modalities,
                           f"--batch-size {batch_size}: a shuffled train batch")
        else:
            for start in range(0, len(lengths), batch_size):
                check_capacity(tuple(lengths[start:start + batch_size]), n_modalities,
                               f"--batch-size {batch_size}: {name} batch {start // batch_size}")


def setup(args: argparse.Namespace) -> tuple[Conversations, dict, M3Net, torch.nn.Module, torch.device, RunLog]:
    """Everything a run needs, checked before the log dir is created (a failed start writes nothing)."""
    device = pick_device(args)
    # Absolute in the flags that are logged and saved: a --resume from another folder finds it.
    args.data_dir = str(find_data_dir(args.Dataset, args.data_dir).resolve())
    data = load_conversations(args.Dataset, args.data_dir)
    seed_everything(args.seed)
    try:
        loaders = make_loaders(data, args.batch_size, valid_frac=args.valid, seed=args.seed,
                               num_workers=args.num_workers, pin_memory=device.type == "cuda")
    except ValueError as e:   # e.g. --valid leaves no train dialogue
        raise UserError(f"--valid {args.valid}: {e}") from None
    used = {"test": loaders["test"]} if args.testing else loaders
    check_batches_fit(used, args.batch_size, len(args.modals))
    model = build_model(args, data).to(device)
    loaded = load_weights(model, args.checkpoint, args) if args.checkpoint else None
    loss_mm = build_loss(args, data, loaders["train"]).to(device)
    log_dir = Path(args.log_dir or f"runs/{args.Dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    log = RunLog(log_dir, tensorboard=args.tensorboard and not args.testing, fresh=not args.log_dir)
    splits = ", ".join(f"{name} {len(loader.dataset)} dialogues" for name, loader in used.items())
    log.line(f"{args.Dataset}: {splits} (from {args.data_dir}); on {device}; log dir {log.dir}")
    if loaded:
        log.line(loaded)
    return data, loaders, model, loss_mm, device, log


# ---------------------------------------------------------------------- train / test
def train(args: argparse.Namespace, given: set[str]) -> None:
    """Train; with --resume, `given` holds the flags on the command line (see resume_point)."""
    resume_from = None
    log_dir = Path(args.log_dir) if args.log_dir else None
    if log_dir is not None:
        check_not_in_use(log_dir)
    holds_run = log_dir is not None and (log_dir / METRICS_FILE).exists()
    if holds_run and not (log_dir / METRICS_FILE).is_file():
        raise UserError(f"--log-dir {log_dir}: its {METRICS_FILE} is not a file; remove it or pick another folder")
    if holds_run and not (log_dir / "last.pt").is_file():
        raise UserError(f"--log-dir {log_dir} holds a run that stopped before it saved its first last.pt: there is "
                        f"nothing to resume; remove that folder or pick another")
    if args.resume:
        args, resume_from = resume_point(args, given)
        done = resume_from["epoch"] + 1
        summarised = _summary_is_current(log_dir, resume_from["best"])
        # With the epochs it has reached, a run whose summary.json is missing (a full disk, a stop
        # after its last epoch) writes it and trains no further.
        if args.epochs < done or (args.epochs == done and summarised):
            hint = "" if summarised else f", or --epochs {done} to write its summary.json"
            raise UserError(f"--resume: the run in {log_dir} has finished {done} of its "
                            f"{resume_from['args']['epochs']} epochs, and --epochs {args.epochs} asks for no more: "
                            f"give --epochs above {done} to continue it{hint}")
    elif holds_run:
        raise UserError(f"--log-dir {log_dir} already holds a run: add --resume to continue it, or pick another folder")
    data, loaders, model, loss_mm, device, log = setup(args)
    with log:
        try:
            log.metrics_path.touch()     # marks the folder as a run's from its first epoch on (see above)
            log.line("flags: " + as_command_line(args))
            step = build_step(args, model, loss_mm)
            scheduler = torch.optim.lr_scheduler.StepLR(step.optimizer, step_size=args.lr_decay_step,
                                                        gamma=args.lr_decay_ratio)
            settings = TrainerSettings(dataset=args.Dataset, epochs=args.epochs, seed=args.seed, flags=vars(args))
            trainer = Trainer(settings, model, step, scheduler, loaders, loss_mm, device, log,
                              list(data.class_names))
            raise_if_stopped()
            if resume_from is not None:
                trainer.resume(resume_from, log.dir / "last.pt")
            trainer.fit()
        except KeyboardInterrupt as e:
            signum = _signal_of(e)
            log.ended(_interrupted(log.dir, signum))
            raise RunInterrupted(log.dir, signum) from None
        except (UserError, DataError, TrainingDiverged) as e:
            log.ended(f"error: {e}")
            raise


# What a resumed run may change: where things are and how long it goes on.
RESUME_MAY_CHANGE = ("epochs", "no_cuda", "no_cuda_graphs", "num_workers", "data_dir")
RESUME_FIELDS = ("model", "optimizer", "scheduler", "epoch", "args", "metrics", "best")


def resume_point(args: argparse.Namespace, given: set[str]) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The saved flags of the run in --log-dir, and its last.pt.

    Of the flags `given` on this command line, the RESUME_MAY_CHANGE ones replace the saved
    values; any other must repeat its saved value (a changed one is an error, not ignored).
    """
    last = Path(args.log_dir) / "last.pt"
    if not last.is_file():
        raise UserError(f"--resume: {last} does not exist")
    state = read_checkpoint(last)
    if not all(key in state for key in RESUME_FIELDS):
        raise UserError(f"--resume: {last} is not a last.pt written by this project's training")
    trained_on = state["args"].get("Dataset", args.Dataset)
    if trained_on != args.Dataset:
        raise UserError(f"--resume: {last} is a {trained_on} run: continue it with "
                        f"run/train_OGM_Shapley_MMPareto_{trained_on}.py")
    _check_run_of_folder(state, last)
    # Flags newer than the run (absent from its saved ones) take this command line's values, except an
    # architecture flag: the run was trained with its default.
    saved = {**vars(args), **{n: flag_default(n) for n in ARCHITECTURE_FLAGS}, **state["args"]}
    changed = sorted(name for name in given - set(RESUME_MAY_CHANGE) - {"log_dir", "resume"}
                     if getattr(args, name) != saved[name])
    if changed:
        raise UserError(f"--resume continues {last} with its saved flags, and this command line changes "
                        f"{', '.join(f'{flag_name(n)} ({saved[n]!r} -> {getattr(args, n)!r})' for n in changed)}: "
                        f"only {', '.join(map(flag_name, RESUME_MAY_CHANGE))} may change")
    saved.update({name: getattr(args, name) for name in given & set(RESUME_MAY_CHANGE)})
    saved.update(log_dir=args.log_dir, resume=True, checkpoint=None)   # the starting weights are in last.pt now
    return argparse.Namespace(**saved), state


def _check_run_of_folder(state: dict[str, Any], last: Path) -> None:
    """last.pt must be the one its folder's run wrote: the records it keeps of its epoch and of its
    best are those epochs' lines in metrics.jsonl. A last.pt copied from another run would go on
    with that run's flags, and leave metrics.jsonl and the summary mixing two runs."""
    metrics = last.parent / METRICS_FILE
    try:
        records = read_records(metrics, state["epoch"]) if metrics.is_file() else {}
    except UserError as e:
        raise UserError(f"--resume: {e}") from None
    for record in (state["metrics"], state["best"]["record"]):
        epoch = record["epoch"]
        if not equal_as_json(records.get(epoch), record):
            found = "differs from" if epoch in records else "is missing from"
            raise UserError(f"--resume: {last} is not the last.pt of the run in {last.parent}: its record of epoch "
                            f"{epoch} {found} {metrics} (a last.pt of another run?); put back the run's own, or "
                            f"continue that other run in its own folder")


def _summary_is_current(log_dir: Path, best: dict[str, Any]) -> bool:
    """Whether log_dir's summary.json is the one the run's best epoch gives."""
    try:
        summary = json.loads((log_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(summary, dict) and summary.get("selected_epoch") == best["epoch"]
            and equal_as_json(summary.get("metrics"), best["record"]))


def test(args: argparse.Namespace) -> None:
    data, loaders, model, loss_mm, device, log = setup(args)
    with log:
        try:
            _write_test_metrics(args, loaders, model, loss_mm, device, log)
        except UserError as e:
            log.ended(f"error: {e}")
            raise


def _write_test_metrics(args: argparse.Namespace, loaders: dict, model: M3Net, loss_mm: torch.nn.Module,
                        device: torch.device, log: RunLog) -> None:
    result = evaluate(model, loaders["test"], loss_mm, device, args.Dataset)
    if not math.isfinite(result["loss"]):
        raise UserError(f"checkpoint {args.checkpoint}: its test loss on this data is NaN/Inf, so its predictions are "
                        f"not a model's; {log.dir / 'test_metrics.json'} not written")
    metrics = {k: result[k] for k in ("loss", "acc", "weighted_f1", "macro_f1", "micro_f1", "per_class_f1", "unimodal",
                                      "coalition_acc", "shapley")}
    metrics["n_utterances"] = int(result["labels"].size)
    metrics["predictions"] = result["preds"].astype(int).tolist()
    try:
        write_json(log.dir / "test_metrics.json", metrics)
    except OSError as e:
        raise UserError(f"cannot write {log.dir / 'test_metrics.json'} ({e.strerror})") from None
    log.line(f"test: acc {metrics['acc']:.2f} weighted F1 {metrics['weighted_f1']:.2f} macro F1 "
             f"{metrics['macro_f1']:.2f} micro F1 {metrics['micro_f1']:.2f} on {metrics['n_utterances']} "
             f"utterances; unimodal acc " + " ".join(f"{m}={v['acc']:.1f}" for m, v in metrics["unimodal"].items())
             + f"; written to {log.dir / 'test_metrics.json'}")
