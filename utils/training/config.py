"""Command line shared by the per-dataset run scripts.

Every flag of the reference scripts is accepted, so old command lines keep working; the ones
this implementation does not read are listed in `NO_EFFECT` and say so in `--help`.
"""
from __future__ import annotations

import argparse
import functools
import shlex
from typing import Any, Sequence

from dataloader.datasets import DATASETS
from utils.errors import OneLineParser, UserError

BASE_MODELS = ("GRU", "LSTM", "Transformer")
MODULATIONS = ("Normal", "OGM", "OGM_GE")

# Reference flags that steer architectures this code base does not contain (DialogRNN, MMGCN,
# DeepGCN, ...): the model is always the multimodal M3Net.
NO_EFFECT = (
    "graph_model", "nodal_attention", "windowp", "windowf", "rec_dropout", "active_listener",
    "attention", "graph_type", "use_topic", "alpha", "multiheads", "graph_construct", "use_gcn",
    "multi_modal", "mm_fusion_mthd", "Deep_GCN_nlayers", "fusion_method",
)


# The methods the sweeps and benchmarks compare, as flag sets of the training script. joint is the
# multimodal loss alone (M3Net as published); plain adds the unimodal losses (MMPareto's "uniform"
# baseline).
METHODS: dict[str, tuple[str, ...]] = {
    "joint": ("--modulation", "Normal", "--no-pareto", "--no-shapley", "--no-unimodal-loss"),
    "plain": ("--modulation", "Normal", "--no-pareto", "--no-shapley"),
    "ogm_ge": ("--no-pareto",),
    "mmpareto": ("--modulation", "Normal", "--no-shapley"),
    "dgs": (),
}


def _no_effect(help_text: str = "") -> str:
    return f"{help_text} [accepted for compatibility; no effect]".strip()


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except None: there the help says what happens without the flag."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser(dataset: str, defaults: dict[str, Any]) -> argparse.ArgumentParser:
    """The parser of run/train_OGM_Shapley_MMPareto_<dataset>.py with that dataset's defaults."""
    p = OneLineParser(
        description=f"Train (or --testing: evaluate) M3Net with Dynamic Gradient Shaping on {dataset}.",
        formatter_class=_HelpFormatter,
    )
    flag = argparse.BooleanOptionalAction

    g = p.add_argument_group("reference flags")
    g.add_argument("--no-cuda", action="store_true", help="run on the CPU even if CUDA is available")
    g.add_argument("--base-model", default="GRU", choices=BASE_MODELS, help="text context encoder")
    g.add_argument("--graph-model", action=flag, default=True, help=_no_effect())
    g.add_argument("--nodal-attention", action=flag, default=True, help=_no_effect())
    g.add_argument("--windowp", type=int, default=10, help=_no_effect())
    g.add_argument("--windowf", type=int, default=10, help=_no_effect())
    g.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    g.add_argument("--l2", type=float, default=3e-5, help="Adam weight decay")
    g.add_argument("--rec-dropout", type=float, default=0.1, help=_no_effect())
    g.add_argument("--dropout", type=float, default=0.5, help="dropout before smax_fc and between RNN layers")
    g.add_argument("--batch-size", type=int, default=8, help="dialogues per batch")
    g.add_argument("--epochs", type=int, default=80, help="training epochs")
    g.add_argument("--class-weight", action=flag, default=True,
                   help="IEMOCAP: weight the NLL by 1/class prior of the training labels")
    g.add_argument("--active-listener", action="store_true", help=_no_effect())
    g.add_argument("--attention", default="general", help=_no_effect())
    g.add_argument("--tensorboard", action="store_true", help="also write scalars for TensorBoard into --log-dir")
    g.add_argument("--graph_type", default="hyper", help=_no_effect())
    g.add_argument("--use_topic", action="store_true", help=_no_effect())
    g.add_argument("--alpha", type=float, default=0.2, help=_no_effect())
    g.add_argument("--alpha_", type=float, default=0.6, help="OGM strength α in κ = 1 − tanh(α(r − 1))")
    g.add_argument("--multiheads", type=int, default=6, help=_no_effect())
    g.add_argument("--graph_construct", default="direct", help=_no_effect())
    g.add_argument("--use_gcn", action="store_true", help=_no_effect())
    g.add_argument("--use_residue", action=flag, default=False,
                   help="also feed the graph input node features to smax_fc (widens it)")
    g.add_argument("--multi_modal", action=flag, default=True, help=_no_effect("always multimodal"))
    g.add_argument("--mm_fusion_mthd", default="concat_DHT", help=_no_effect("always concat_DHT"))
    g.add_argument("--modals", default="avl", help="modalities to use: any non-empty subset of 'avl'")
    g.add_argument("--av_using_lstm", action="store_true",
                   help="run audio/visual through their own 2-layer bidirectional RNN (a GRU with --base-model GRU, else an LSTM)")
    g.add_argument("--Deep_GCN_nlayers", type=int, default=4, help=_no_effect())
    g.add_argument("--Dataset", default=dataset, choices=tuple(DATASETS), help="must match the script")
    g.add_argument("--use_speaker", action=flag, default=True, help="add speaker embeddings to text nodes")
    g.add_argument("--use_modal", action=flag, default=False, help="add modality embeddings to all nodes")
    g.add_argument("--norm", default="BN", help="text layer normalisation: BN, LN, LN2, or anything else for none")
    g.add_argument("--testing", action="store_true", help="evaluate --checkpoint on the test split and exit")
    g.add_argument("--num_L", type=int, default=1, help="hypergraph layers (0 turns the branch off)")
    g.add_argument("--num_K", type=int, default=1, help="high-frequency graph layers (0 turns the branch off)")
    g.add_argument("--fusion_method", default="concat", help=_no_effect())
    g.add_argument("--modulation", default="OGM_GE", choices=MODULATIONS,
                   help="gradient modulation of the dominant modality's encoder")
    g.add_argument("--lr_decay_step", type=int, default=70, help="StepLR step size (epochs)")
    g.add_argument("--lr_decay_ratio", type=float, default=0.1, help="StepLR factor")
    g.add_argument("--modulation_starts", type=int, default=0, help="first epoch (0-based) with OGM")
    g.add_argument("--modulation_ends", type=int, default=80, help="last epoch (0-based) with OGM")

    g = p.add_argument_group("this implementation")
    g.add_argument("--data-dir", default=None,
                   help="folder holding <Dataset>_features/ (default: the current directory, then the repo's data/)")
    g.add_argument("--log-dir", default=None, help="output folder (default: runs/<Dataset>-<timestamp>)")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--valid", type=float, default=0.0,
                   help="fraction of train dialogues held out for model selection (0: select on test, as the reference)")
    g.add_argument("--no-pareto", action="store_true", help="sum the multimodal and unimodal gradients instead of MMPareto")
    g.add_argument("--no-shapley", action="store_true", help="skip the Shapley valuation (and so OGM scaling)")
    g.add_argument("--no-unimodal-loss", action="store_true",
                   help="train the encoders on the multimodal loss alone (M3Net as published); the unimodal heads "
                        "are still fitted, on detached encoder outputs (needs --no-pareto)")
    g.add_argument("--pareto-gamma", type=float, default=1.0, help="MMPareto magnitude factor γ")
    g.add_argument("--checkpoint", default=None, help="weights to start from or test: ours, or a raw M3Net state_dict")
    g.add_argument("--resume", action="store_true", help="continue the run in --log-dir from its last.pt")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument("--text_linear", action=flag, default=True,
                   help="project the averaged text layers by linear_l before the text context encoder, as DGS's "
                        "model does (--no-text_linear: upstream M3Net's MELD model, which has linear_l but never "
                        "reads it; linear_l is then loaded and saved, not trained)")
    g.add_argument("--no-cuda-graphs", action="store_true",
                   help="on the GPU, train the context RNN and shape the gradients eagerly instead of "
                        "replaying them from CUDA graphs (no effect on the CPU)")

    p.set_defaults(**defaults)
    return p


def parse_args(dataset: str, defaults: dict[str, Any], argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags; a bad combination raises UserError."""
    args = build_parser(dataset, defaults).parse_args(argv)
    check_args(args, dataset)
    return args


def given_flags(dataset: str, defaults: dict[str, Any], argv: Sequence[str] | None = None) -> set[str]:
    """The names (dests) of the flags present on the command line, whatever their values."""
    parser = build_parser(dataset, defaults)
    # argparse fills in a default only for names the namespace it is handed lacks: pre-filled
    # with a marker, exactly the flags left off the command line keep it.
    absent = object()
    namespace = argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), absent))
    return {name for name, value in vars(parser.parse_args(argv, namespace=namespace)).items() if value is not absent}


@functools.lru_cache(maxsize=1)
def _flag_actions() -> tuple[argparse.Action, ...]:
    """The parser's flags (either dataset's: they differ in defaults only), `--help` left out."""
    return tuple(action for action in build_parser(next(iter(DATASETS)), {})._actions
                 if action.option_strings and action.dest != "help")


def flag_name(name: str) -> str:
    """A flag's name in the namespace (`no_cuda`) as typed on the command line (`--no-cuda`)."""
    return next(action.option_strings[0] for action in _flag_actions() if action.dest == name)


def as_command_line(args: argparse.Namespace, names: Sequence[str] | None = None) -> str:
    """The flags of `args` (or those `names` only) written as a command line gives them, in
    `--help` order: what a run logs can be pasted back. Flags without a value (None) and switches
    that are off are left out."""
    words = []
    for action in _flag_actions():
        value = getattr(args, action.dest, None)
        if value is None or (names is not None and action.dest not in names):
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            words.append(action.option_strings[0 if value else 1])
        elif action.nargs == 0:                  # store_true
            words += [action.option_strings[0]] if value else []
        else:
            words += [action.option_strings[0], shlex.quote(str(value))]
    return " ".join(words)


def check_args(args: argparse.Namespace, dataset: str) -> None:
    if args.Dataset != dataset:
        raise UserError(f"--Dataset {args.Dataset} given to the {dataset} script; "
                        f"use run/train_OGM_Shapley_MMPareto_{args.Dataset}.py")
    if not args.modals or set(args.modals) - set("avl") or len(set(args.modals)) != len(args.modals):
        raise UserError(f"--modals {args.modals!r}: give a non-empty subset of 'avl' without repeats")
    for name in ("batch_size", "epochs"):
        if getattr(args, name) < 1:
            raise UserError(f"{flag_name(name)} must be at least 1")
    for name in ("num_L", "num_K", "lr_decay_step"):
        if getattr(args, name) < (1 if name == "lr_decay_step" else 0):
            raise UserError(f"--{name} {getattr(args, name)} is out of range")
    for flag in ("--lr", "--l2", "--alpha_", "--pareto-gamma", "--lr_decay_ratio"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if not 0.0 <= value < float("inf"):
            raise UserError(f"{flag} {value}: give a non-negative number")
    if not 0.0 <= args.dropout < 1.0:
        raise UserError(f"--dropout {args.dropout}: give a probability in [0, 1)")
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed {args.seed}: give an integer in [0, 2^32)")
    if args.num_workers < 0:
        raise UserError(f"--num-workers {args.num_workers}: give 0 (load in the main process) or more")
    if args.modulation != "Normal" and args.modulation_starts > args.modulation_ends:
        raise UserError(f"--modulation_starts {args.modulation_starts} is after --modulation_ends "
                        f"{args.modulation_ends}: OGM would never run (--modulation Normal turns it off)")
    if not 0.0 <= args.valid < 1.0:
        raise UserError(f"--valid {args.valid}: give a fraction in [0, 1)")
    if args.no_unimodal_loss and not args.no_pareto:
        raise UserError("--no-unimodal-loss leaves MMPareto no unimodal gradient to merge: add --no-pareto")
    if args.testing and not args.checkpoint:
        raise UserError("--testing needs --checkpoint PATH")
    if args.resume and not args.log_dir:
        raise UserError("--resume needs the --log-dir of the run to continue")
    if args.resume and args.checkpoint:
        raise UserError("--resume continues from <log-dir>/last.pt; do not also give --checkpoint")


# Flags that shape the model or its forward pass: a checkpoint gives its predictions only with
# the values it was trained with. These leave a state_dict's keys and shapes as they are, so
# only a checkpoint's saved flags can tell them.
UNSEEN_IN_KEYS = ("norm", "use_speaker", "use_modal", "text_linear")
# A flag added here must default to the model as it was before the flag existed: checkpoints
# saved before then lack it and were trained that way (`flag_default`).
ARCHITECTURE_FLAGS = ("modals", "base_model", "norm", "num_L", "num_K", "use_speaker", "use_modal",
                      "use_residue", "av_using_lstm", "text_linear")


def flag_default(name: str) -> Any:
    """A flag's default before any dataset's (the value a run saved before the flag existed had)."""
    return next(action.default for action in _flag_actions() if action.dest == name)


def architecture_differences(saved: dict[str, Any], args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The architecture flags on which a checkpoint's saved flags and `args` differ, written as
    flags: (the checkpoint's, this run's). No saved flags (a raw state_dict): none to compare; a
    flag missing from them is newer than the checkpoint, which then had its default."""
    if not saved:
        return [], []
    theirs, ours = [], []
    for name in ARCHITECTURE_FLAGS:
        value = saved.get(name, flag_default(name))
        if _canonical(name, value) != _canonical(name, getattr(args, name)):
            theirs.append(_as_flag(name, value))
            ours.append(_as_flag(name, getattr(args, name)))
    return theirs, ours


def _canonical(name: str, value: Any) -> Any:
    if name == "modals":
        return frozenset(value)
    if name == "norm":
        return value if value in ("BN", "LN", "LN2") else "none"
    return value


def _as_flag(name: str, value: Any) -> str:
    # A switch that is off has no flag of its own: "no --av_using_lstm".
    return as_command_line(argparse.Namespace(**{name: value}), [name]) or f"no {flag_name(name)}"
