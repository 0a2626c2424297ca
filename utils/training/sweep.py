"""python run/sweep.py: methods × seeds (× a grid) of training runs, locally or on Ray, into tables.

  python run/sweep.py --Dataset IEMOCAP --methods joint plain ogm_ge mmpareto dgs --seeds 1 2 3 --out DIR \\
      [--grid alpha_=0.3,0.6,0.9 ...] [--workers N] [--backend local|ray] -- <training flags>

Each (method, grid point, seed) is a normal training run of run/train_OGM_Shapley_MMPareto_<Dataset>.py
in DIR/runs/<name>/ (e.g. dgs-alpha_0.3-seed1), with every output a single run has (with
--valid 0.2 unless the training flags give --valid: epochs selected on validation); its stderr
goes to DIR/logs/<name>.stderr. DIR/sweep.json records the sweep's definition. Rerunning the same
command trains nothing that finished, resumes a stopped run from its last.pt and restarts one
stopped before its first last.pt; it may add methods, seeds and grid values to the sweep. Then
DIR/results.csv, DIR/results.md and DIR/plots/ are written (utils/training/aggregate.py);
--aggregate DIR writes them alone.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TextIO

from dataloader.datasets import DATASETS, DataError, data_files, find_data_dir
from utils.errors import OneLineParser, UserError
from utils.files import write_json
from utils.training.aggregate import aggregate, default_baseline
from utils.training.config import METHODS, NO_EFFECT, as_command_line, build_parser, check_args, flag_name
from utils.training.runlog import METRICS_FILE, check_not_in_use
from utils.training.workers import (Job, Outcome, StopSignals, plural, run_local, run_on_ray, threads_per_run,
                                    usable_cores)

try:
    import fcntl
except ImportError:          # Windows: there a second sweep in the same folder is not refused
    fcntl = None

REPO = Path(__file__).resolve().parents[2]

# Flags the sweep sets for every run itself.
SWEEP_FLAGS = ("Dataset", "data_dir", "log_dir", "seed", "resume", "testing")
# Where a sweep holds the model selection honest unless the training flags say otherwise.
DEFAULT_VALID = "0.2"
# What may differ between a run folder's saved flags and the sweep's: where the run's folder is,
# and what a resumed run drops (its starting weights are in last.pt then).
PER_FOLDER_FLAGS = ("log_dir", "resume", "checkpoint")
DEFINITION_FILE = "sweep.json"
# The parts of a definition that make it the same sweep; methods, seeds and grid values may grow.
IDENTITY = ("Dataset", "data_dir", "training_flags", "grid")


@dataclass
class Run:
    name: str
    method: str
    seed: int
    grid: dict[str, str]            # grid flag -> value, as in the run's name
    args: argparse.Namespace        # every flag of the run

    @property
    def entry(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "seed": self.seed, "grid": self.grid}


# ---------------------------------------------------------------------- the training script's flags
def training_script(dataset: str) -> Path:
    return REPO / "run" / f"train_OGM_Shapley_MMPareto_{dataset}.py"


def training_parser(dataset: str, what: str) -> argparse.ArgumentParser:
    """The training script's parser, raising UserError (prefixed with `what`) where it would exit."""
    parser = build_parser(dataset, DATASETS[dataset].train_defaults)

    def error(message: str) -> None:
        raise UserError(f"{what}: {message}")

    parser.error = error
    return parser


def parse_training_flags(dataset: str, words: Sequence[str], what: str) -> tuple[argparse.Namespace, set[str]]:
    """The training script's namespace of `words`, and the names of the flags they give."""
    parser = training_parser(dataset, what)
    # As in utils.training.config.given_flags: argparse fills in defaults only for names the namespace lacks.
    absent = object()
    namespace = argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), absent))
    parsed = parser.parse_args(list(words), namespace=namespace)
    given = {name for name, value in vars(parsed).items() if value is not absent}
    return parser.parse_args(list(words)), given


def flag_action(dataset: str, name: str) -> argparse.Action | None:
    """The training flag called `name` (as typed without its dashes, or its name in the namespace)."""
    for action in training_parser(dataset, "--grid")._actions:
        if f"--{name}" in action.option_strings or (action.option_strings and action.dest == name):
            return action
    return None


def method_flags(dataset: str) -> set[str]:
    """The flags (namespace names) that some method sets."""
    return set().union(*(parse_training_flags(dataset, words, "METHODS")[1] for words in METHODS.values()))


# ---------------------------------------------------------------------- the sweep's definition
def parse_grid(dataset: str, items: Sequence[str], reserved: set[str]) -> dict[str, list[str]]:
    """--grid name=v1,v2 ...: {flag as typed on the training command line: [values]}."""
    grid: dict[str, list[str]] = {}
    dests = set()
    for item in items:
        name, sep, values = item.partition("=")
        name = name.removeprefix("--")
        if not sep or not name or not values:
            raise UserError(f"--grid {item}: give name=value1,value2,... (e.g. --grid alpha_=0.3,0.6)")
        action = flag_action(dataset, name)
        if action is None:
            raise UserError(f"--grid {item}: the {dataset} training script has no flag --{name}")
        option = action.option_strings[0].removeprefix("--")
        if action.dest in dests:
            raise UserError(f"--grid {item}: --{option} is already on the grid")
        if action.dest in NO_EFFECT:
            raise UserError(f"--grid {item}: --{option} has no effect on training (see its --help)")
        if action.dest in reserved:
            how = "by --methods" if action.dest in method_flags(dataset) else "itself"
            raise UserError(f"--grid {item}: the sweep sets --{option} {how}")
        if action.nargs == 0:
            raise UserError(f"--grid {item}: --{option} is a switch; a grid takes flags with a value")
        normalised = []
        for value in values.split(","):
            parsed = getattr(training_parser(dataset, f"--grid {item}").parse_args([f"--{option}", value]),
                             action.dest)
            shown = str(parsed) if isinstance(parsed, (int, float)) else value
            if not shown or "/" in shown or shown != shown.strip() or shown.startswith("."):
                raise UserError(f"--grid {item}: value {value!r} cannot be part of a run folder's name")
            if shown in normalised:
                raise UserError(f"--grid {item}: value {value} is given twice")
            normalised.append(shown)
        grid[option] = normalised
        dests.add(action.dest)
    return grid


def run_name(method: str, grid: dict[str, str], seed: int) -> str:
    parts = [method] + [f"{name.rstrip('_')}_{value}" for name, value in grid.items()] + [f"seed{seed}"]
    return "-".join(parts)


def grid_points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    points: list[dict[str, str]] = [{}]
    for name, values in grid.items():
        points = [{**point, name: value} for point in points for value in values]
    return points


def run_args(dataset: str, data_dir: str, training_words: Sequence[str], method: str, grid: dict[str, str],
             seed: int, folder: Path) -> argparse.Namespace:
    words = [*METHODS[method], *(w for name, value in grid.items() for w in (f"--{name}", value)), *training_words,
             "--data-dir", data_dir, "--log-dir", str(folder), "--seed", str(seed)]
    name = run_name(method, grid, seed)
    args = training_parser(dataset, name).parse_args(words)
    try:
        check_args(args, dataset)
    except UserError as e:
        raise UserError(f"run {name}: {e}") from None
    return args


def training_words(dataset: str, words: Sequence[str], reserved: set[str], grid: set[str]) -> tuple[list[str], str]:
    """The training flags after --, with the sweep's --valid default; and the same written canonically."""
    _, given = parse_training_flags(dataset, words, "training flags after --")
    for name in sorted(given & reserved):
        how = "by --methods" if name in method_flags(dataset) else "by --grid" if name in grid else "itself"
        raise UserError(f"training flags after --: the sweep sets {flag_name(name)} {how}")
    words = list(words) if "valid" in given else [*words, "--valid", DEFAULT_VALID]
    args, given = parse_training_flags(dataset, words, "training flags after --")
    return words, as_command_line(args, sorted(given))


def check_out_dir(out: Path, definition: dict[str, Any]) -> dict[str, Any] | None:
    """The definition DIR/sweep.json holds, after checking that it is this sweep's; None for a new
    or empty folder."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    path = out / DEFINITION_FILE
    if not path.exists():
        if out.is_dir() and any(p.name != ".lock" for p in out.iterdir()):
            raise UserError(f"--out {out}: holds files but no {DEFINITION_FILE}, so no sweep: pick a new or empty folder")
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--out {out}: its {DEFINITION_FILE} cannot be read ({e})") from None
    if not isinstance(saved, dict) or any(key not in saved for key in (*IDENTITY, "runs")):
        raise UserError(f"--out {out}: its {DEFINITION_FILE} is not a sweep's definition")
    for key in IDENTITY:
        if saved[key] != definition[key]:
            raise UserError(f"--out {out} holds another sweep: its {describe(key, saved[key])}, this command's "
                            f"{describe(key, definition[key])}; pick another --out, or rerun that sweep's command")
    return saved


def describe(key: str, value: Any) -> str:
    if key == "training_flags":
        return f"training flags are `{value}`"
    if key == "grid":
        return f"grid flags are {', '.join(value) or 'none'}"
    return f"{'data folder' if key == 'data_dir' else key} is {value}"


def merge_runs(saved: dict[str, Any] | None, runs: Sequence[Run]) -> list[dict[str, Any]]:
    """The runs of the saved definition, then this command's new ones."""
    entries = list(saved["runs"]) if saved else []
    known = {entry["name"] for entry in entries}
    return entries + [run.entry for run in runs if run.name not in known]


# ---------------------------------------------------------------------- run folders
def saved_args(folder: Path, dataset: str) -> argparse.Namespace | None:
    """The flags of train.log's latest `flags:` line (a resumed run logs them again); None if none."""
    log = folder / "train.log"
    if not log.is_file():
        return None
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("flags: ")]
    if not lines:
        return None
    try:
        words = shlex.split(lines[-1].removeprefix("flags: "))
    except ValueError as e:
        raise UserError(f"{log}: its flags line cannot be read ({e})") from None
    return training_parser(dataset, f"{log}: its flags line").parse_args(words)


def folder_state(run: Run, folder: Path) -> str:
    """'new', 'finished', 'resume' (from last.pt) or 'restart' (stopped before its first last.pt).
    A folder whose run has other flags, or that a live run holds, is a UserError."""
    if not folder.exists():
        return "new"
    if not folder.is_dir():
        raise UserError(f"{folder}: exists and is not a run folder; remove it")
    check_not_in_use(folder)
    saved = saved_args(folder, run.args.Dataset)
    if saved is not None:
        differ = [name for name in vars(run.args) if name not in PER_FOLDER_FLAGS
                  and getattr(saved, name, None) != getattr(run.args, name)]
        if differ:
            raise UserError(f"{folder} holds a run trained with {as_command_line(saved, differ)}, where this sweep "
                            f"gives {as_command_line(run.args, differ)}: remove that folder, or use another --out")
    if (folder / "summary.json").is_file():
        if saved is None:
            raise UserError(f"{folder}: has a summary.json but no flags line in its train.log; remove that folder")
        return "finished"
    return "resume" if (folder / "last.pt").is_file() else "restart"


def command(run: Run, resume: bool) -> list[str]:
    args = argparse.Namespace(**{**vars(run.args), **({"resume": True, "checkpoint": None} if resume else {})})
    return [str(training_script(run.args.Dataset)), *shlex.split(as_command_line(args))]


# ---------------------------------------------------------------------- the whole sweep
@functools.lru_cache(maxsize=None)
def cuda_devices() -> tuple[str, ...]:
    """The GPUs a local sweep may hand out (as CUDA_VISIBLE_DEVICES values)."""
    import torch
    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(count)]
    return tuple(ids[:count])


class SweepLock:
    """An exclusive flock on DIR/.lock while the sweep runs: a second sweep in DIR is refused."""

    def __init__(self, out: Path):
        self.handle: TextIO = open(out / ".lock", "a")
        if fcntl is not None:
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self.handle.close()
                raise UserError(f"--out {out} is in use by another sweep that is still going") from None

    def close(self) -> None:
        self.handle.close()


def sweep(options: argparse.Namespace, training: Sequence[str]) -> int:
    """Check everything, then train what is left and aggregate; the exit status."""
    dataset = options.Dataset
    if len(set(options.seeds)) != len(options.seeds):
        raise UserError(f"--seeds {' '.join(map(str, options.seeds))}: give each seed once")
    if len(set(options.methods)) != len(options.methods):
        raise UserError(f"--methods {' '.join(options.methods)}: give each method once")
    if options.workers is not None and options.workers < 1:
        raise UserError(f"--workers {options.workers}: give 1 or more")
    if options.ray_address and options.backend != "ray":
        raise UserError("--ray-address needs --backend ray")
    reserved = set(SWEEP_FLAGS) | method_flags(dataset)
    grid = parse_grid(dataset, options.grid, reserved)
    grid_dests = {flag_action(dataset, name).dest for name in grid}
    words, canonical = training_words(dataset, training, reserved | grid_dests, grid_dests)
    data_dir = find_data_dir(dataset, options.data_dir)
    data_files(dataset, data_dir)
    data_dir = str(data_dir.resolve())
    out = options.out.resolve()
    runs = [Run(run_name(method, point, seed), method, seed, point,
                run_args(dataset, data_dir, words, method, point, seed, out / "runs" / run_name(method, point, seed)))
            for method in options.methods for point in grid_points(grid) for seed in options.seeds]
    definition = {"Dataset": dataset, "data_dir": data_dir, "training_flags": canonical, "grid": list(grid),
                  "methods": {m: " ".join(METHODS[m]) for m in METHODS}}
    saved = check_out_dir(out, definition)
    lock = SweepLock(out) if out.is_dir() else None
    try:
        definition["runs"] = merge_runs(saved, runs)
        baseline = options.baseline or default_baseline({entry["method"] for entry in definition["runs"]})
        if options.baseline and options.baseline not in {entry["method"] for entry in definition["runs"]}:
            raise UserError(f"--baseline {options.baseline}: not a method of this sweep")
        states = {run.name: folder_state(run, out / "runs" / run.name) for run in runs}
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = lock or SweepLock(out)
            (out / "logs").mkdir(exist_ok=True)
            write_json(out / DEFINITION_FILE, definition)
        except OSError as e:
            raise UserError(f"--out {out}: cannot write in it ({e.strerror})") from None
        for run in runs:
            if states[run.name] == "restart":
                shutil.rmtree(out / "runs" / run.name)
        return train_and_aggregate(options, out, runs, states, baseline)
    finally:
        if lock is not None:
            lock.close()


def train_and_aggregate(options: argparse.Namespace, out: Path, runs: Sequence[Run], states: dict[str, str],
                        baseline: str | None) -> int:
    todo = [run for run in runs if states[run.name] != "finished"]
    jobs = [Job(run.name, command(run, states[run.name] == "resume"), out / "logs" / f"{run.name}.stderr")
            for run in todo]
    on_cpu = any(run.args.no_cuda for run in runs)
    counts = {state: sum(s == state for s in states.values()) for state in ("finished", "resume", "restart", "new")}
    print(f"sweep {options.Dataset}: {len(runs)} runs in {out / 'runs'}: {counts['finished']} finished before, "
          f"{counts['resume']} to resume, {counts['restart'] + counts['new']} to start"
          + (f" ({counts['restart']} of them again, stopped before their first last.pt)" if counts["restart"] else ""),
          flush=True)
    report = Progress(len(jobs), out, options.drop_checkpoints)
    stop = StopSignals()
    with stop:
        if not jobs:
            pass
        elif options.backend == "ray":
            run_on_ray(jobs, options.workers, options.ray_address, not on_cpu, report.done, stop)
        else:
            gpus = () if on_cpu else cuda_devices()
            workers = options.workers or len(gpus) or max(1, usable_cores() // 2)
            threads = threads_per_run(workers, usable_cores())
            print(f"local backend: {plural(workers, 'worker')}, {plural(threads, 'thread')} per run"
                  + (f", GPUs {','.join(gpus)}" if gpus else ""), flush=True)
            run_local(jobs, workers, threads, gpus, report.done, stop)
    report.close()
    if stop.signum is not None:
        name = signal.Signals(stop.signum).name
        print(f"sweep stopped by {name}: {plural(report.finished, 'run')} finished this time, {len(report.stopped)} "
              f"stopped (each keeps its last finished epoch), {len(jobs) - report.count} not started; rerun the same "
              f"command to go on",
              file=sys.stderr)
        return 128 + stop.signum
    tables = aggregate(out, baseline)
    print(f"tables: {tables} and {out / 'results.csv'}, plots in {out / 'plots'}")
    if report.failed:
        print(f"error: {len(report.failed)} of {len(runs)} runs failed: {', '.join(report.failed)} (their stderr: "
              f"{out / 'logs'}/<run>.stderr, their log: {out / 'runs'}/<run>/train.log); rerun the same command "
              f"to retry them", file=sys.stderr)
        return 1
    return 0


class Progress:
    """One line per finished run (a bar over the runs on a TTY, with the lines above it)."""

    def __init__(self, total: int, out: Path, drop_checkpoints: bool):
        self.total, self.out, self.drop_checkpoints = total, out, drop_checkpoints
        self.count, self.finished = 0, 0
        self.failed: list[str] = []
        self.stopped: list[str] = []
        self.bar = None
        if sys.stderr.isatty() and total:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="run", desc="sweep")

    def done(self, outcome: Outcome, stopping: bool) -> None:
        self.count += 1
        name, folder = outcome.job.name, self.out / "runs" / outcome.job.name
        head = f"[{self.count}/{self.total}] {name}"
        summary = folder / "summary.json"
        if outcome.returncode == 0 and summary.is_file():
            self.finished += 1
            line = f"{head}: finished in {outcome.seconds:.0f} s, {finished_line(summary)}"
            if self.drop_checkpoints:
                for checkpoint in ("best.pt", "last.pt"):
                    (folder / checkpoint).unlink(missing_ok=True)
        elif stopping:
            self.stopped.append(name)
            line = f"{head}: stopped after {outcome.seconds:.0f} s"
        else:
            self.failed.append(name)
            line = (f"{head}: FAILED (exit status {outcome.returncode}) after {outcome.seconds:.0f} s: "
                    f"{last_line(outcome, folder)}")
        if self.bar is not None:
            self.bar.write(line)
            self.bar.update()
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def finished_line(summary_path: Path) -> str:
    summary = json.loads(summary_path.read_text())
    test, epoch = summary["metrics"]["test"], summary["selected_epoch"]
    on = "valid" if "valid" in summary["metrics"] else "test"
    return f"test weighted F1 {test['weighted_f1']:.2f} acc {test['acc']:.2f} (epoch {epoch} in {METRICS_FILE}, selected on {on})"


def last_line(outcome: Outcome, folder: Path) -> str:
    """What a failed run said last: on stderr, else in its train.log."""
    if outcome.message:
        return outcome.message
    for path in (outcome.job.stderr_path, folder / "train.log"):
        try:
            lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            continue
        if lines:
            return lines[-1].strip()
    return "no output"


# ---------------------------------------------------------------------- command line
def build_sweep_parser() -> argparse.ArgumentParser:
    methods = "; ".join(f"{name}: {' '.join(flags) or 'no flag (full DGS)'}" for name, flags in METHODS.items())
    p = OneLineParser(prog="python run/sweep.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--Dataset", choices=tuple(DATASETS), help="the dataset (its training script runs each run)")
    p.add_argument("--data-dir", help="folder holding <Dataset>_features/ (default: as training finds it)")
    p.add_argument("--methods", nargs="+", choices=tuple(METHODS), metavar="METHOD",
                   help=f"methods to compare, each a set of training flags ({methods})")
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="the seeds of every method and grid point")
    p.add_argument("--out", type=Path, metavar="DIR", help="the sweep's folder (runs, tables, plots)")
    p.add_argument("--grid", nargs="+", default=[], metavar="NAME=V1,V2",
                   help="a training flag and its values, run for every method and seed (several: every combination)")
    p.add_argument("--workers", type=int, help="runs at a time (local default: one per GPU, else half the cores; "
                                               "Ray default: one per GPU of the cluster, else half its CPUs)")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local worker processes, or Ray tasks (pip install -r requirements-ray.txt)")
    p.add_argument("--ray-address", metavar="ADDR", help="the Ray cluster to join (default: a local Ray instance)")
    p.add_argument("--baseline", choices=tuple(METHODS), metavar="METHOD",
                   help="the method the others are compared with, seed by seed (default: joint if swept, else plain)")
    p.add_argument("--drop-checkpoints", action="store_true",
                   help="delete best.pt and last.pt of each run once it has finished (the tables need neither)")
    p.add_argument("--aggregate", type=Path, metavar="DIR", help="only write the tables and plots of the sweep in DIR")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = build_sweep_parser()
    options = parser.parse_args(argv[:split])
    training = argv[split + 1:]
    try:
        if options.aggregate is not None:
            given = [f"--{name.replace('_', '-') if name != 'Dataset' else name}" for name in
                     ("Dataset", "methods", "seeds", "out", "data_dir", "workers", "ray_address")
                     if getattr(options, name) is not None] + (["--grid"] if options.grid else [])
            if given or training or options.backend != "local" or options.drop_checkpoints:
                raise UserError(f"--aggregate DIR writes the tables of a sweep done: give it alone (or with "
                                f"--baseline), not {' '.join(given + training) or '--backend/--drop-checkpoints'}")
            status = aggregate_only(options.aggregate, options.baseline)
        else:
            missing = [flag for flag, value in (("--Dataset", options.Dataset), ("--methods", options.methods),
                                                ("--seeds", options.seeds), ("--out", options.out)) if value is None]
            if missing:
                raise UserError(f"a sweep needs {', '.join(missing)} (or --aggregate DIR)")
            status = sweep(options, training)
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        status = 2
    sys.exit(status)


def aggregate_only(out: Path, baseline: str | None) -> int:
    path = out / DEFINITION_FILE
    if not path.is_file():
        raise UserError(f"--aggregate {out}: no {DEFINITION_FILE} there, so no sweep")
    try:
        definition = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"--aggregate {out}: its {DEFINITION_FILE} cannot be read ({e})") from None
    methods = {entry["method"] for entry in definition.get("runs", [])}
    if baseline and baseline not in methods:
        raise UserError(f"--baseline {baseline}: not a method of the sweep in {out}")
    tables = aggregate(out, baseline or default_baseline(methods))
    print(f"tables: {tables} and {out / 'results.csv'}, plots in {out / 'plots'}")
    return 0
