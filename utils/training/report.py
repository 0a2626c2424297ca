"""python run/report.py RUN_DIR [RUN_DIR ...] [--out DIR] [--no-probe]: draw training runs.

Writes into RUN_DIR/report/ (several runs: into --out DIR, their curves overlaid):
  curves.png      loss and weighted F1 per split over epochs, the selected epoch marked
  modalities.png  per modality over epochs: training Shapley score, kappa, conflict fraction,
                  unimodal head accuracy and held-out Shapley value on valid / test
  confusion.png   the selected epoch's test confusion matrix, normalised per true class
  probe.json      linear probes of best.pt's encoder outputs (utils/training/probes.py)
  report.md       the plots and the tables
A run still going is drawn as far as it got: without summary.json the selection so far comes from
last.pt, and without any checkpoint from metrics.jsonl alone (then no confusion matrix).
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import confusion_matrix

from dataloader.datasets import DATASETS, MODALITY_NAMES, DataError
from model.checkpoint import read_checkpoint
from utils.errors import OneLineParser, UserError
from utils.files import atomic_path, write_json
from utils.training.figures import new_figure, save_figure
from utils.training.probes import ProbeResult, linear_probes
from utils.training.runlog import METRICS_FILE

SPLITS = ("train", "valid", "test")
EVALUATED = ("valid", "test")
SPLIT_LINES = {"train": ":", "valid": "--", "test": "-"}
SPLIT_COLOURS = {"train": "tab:gray", "valid": "tab:orange", "test": "tab:blue"}
# How training words its selection rule (summary.json's "selected_by"), by the split it selects on.
SELECTED_BY = {"valid": "best validation weighted F1 (--valid)",
               "test": "best test weighted F1 (the reference protocol; no validation split)"}
NOT_LOGGED = "not logged"


@dataclass
class Run:
    """What a run folder holds, read once."""

    dir: Path
    name: str                        # the label in plots and tables
    records: list[dict[str, Any]]    # metrics.jsonl, one per epoch
    epochs: pd.DataFrame             # the same, flattened: columns "test/acc", "modalities/l/coeff", ...
    dataset: str | None
    modals: str                      # modality letters in --modals order
    selected: dict[str, Any]         # the selected epoch's record
    selected_by: str
    source: str                      # where the selection comes from, for the report
    confusion: np.ndarray | None     # the selected epoch's test confusion matrix (rows: true class)
    probes: ProbeResult | None = None

    @property
    def selected_epoch(self) -> int:
        return int(self.selected["epoch"])

    @property
    def class_names(self) -> list[str]:
        if self.dataset in DATASETS:
            return list(DATASETS[self.dataset].class_names)
        logged = value(self.selected, "test", "per_class_f1")
        if logged:
            return list(logged)
        return [str(c) for c in range(len(self.confusion) if self.confusion is not None else 0)]

    def column(self, name: str) -> pd.Series | None:
        """One flattened metric over the epochs, as numbers; None when no epoch logged it."""
        if name not in self.epochs:
            return None
        values = pd.to_numeric(self.epochs[name], errors="coerce")
        return None if values.isna().all() else values

    @property
    def x(self) -> pd.Series:
        """Epochs counted from 1, as the log lines count them."""
        return self.epochs["epoch"] + 1


def value(record: dict[str, Any] | None, *keys: str) -> Any:
    """record[k1][k2]...; None where a level is missing."""
    for key in keys:
        if not isinstance(record, dict) or key not in record:
            return None
        record = record[key]
    return record


# ---------------------------------------------------------------------- reading a run folder
def load_run(folder: Path, name: str) -> Run:
    metrics = folder / METRICS_FILE
    if not metrics.is_file():
        raise UserError(f"{folder}: not a run folder (no {METRICS_FILE})")
    records = read_records(metrics)
    flags = logged_flags(folder / "train.log")
    summary = current_summary(folder)
    confusion = None
    if summary is not None:
        selected, selected_by = summary["metrics"], summary["selected_by"]
        confusion = np.array(summary["test_confusion_matrix"])
        source = "the run has finished (summary.json)"
    elif (folder / "last.pt").is_file():
        state = read_checkpoint(folder / "last.pt")
        if not isinstance(state.get("best"), dict) or "args" not in state:
            raise UserError(f"{folder / 'last.pt'}: not a last.pt written by this project's training")
        flags = {**flags, **state["args"]}
        best = state["best"]
        selected = best["record"]
        selected_by = SELECTED_BY["valid" if "valid" in selected else "test"]
        n_classes = len(DATASETS[flags["Dataset"]].class_names) if flags.get("Dataset") in DATASETS else None
        classes = range(n_classes or max(best["test_labels"] + best["test_preds"]) + 1)
        confusion = confusion_matrix(best["test_labels"], best["test_preds"], labels=list(classes))
        source = (f"a run in progress or stopped (no summary.json of its latest epochs): the best epoch so far, "
                  f"from last.pt (saved after epoch {state['epoch'] + 1})")
    else:
        split = "valid" if "valid" in records[0] else "test"
        selected = first_best(records, split)
        selected_by = SELECTED_BY[split]
        source = ("no summary.json and no checkpoint yet: selected from metrics.jsonl by training's rule; "
                  "no confusion matrix")
    dataset = flags.get("Dataset")
    modals = flags.get("modals") or "".join(records[0].get("modalities") or {})
    return Run(folder, name, records, pd.json_normalize(records, sep="/"), dataset, modals, selected,
               selected_by, source, confusion)


def first_best(records: Sequence[dict[str, Any]], split: str) -> dict[str, Any]:
    """Training's rule: the first epoch with the highest weighted F1 on `split`."""
    best = records[0]
    for record in records[1:]:
        score = value(record, split, "weighted_f1")
        if score is not None and score > (value(best, split, "weighted_f1") or -1.0):
            best = record
    return best


def read_records(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records. A run appends one per epoch, so an unterminated last line that does
    not parse is one being written right now: left out, not an error."""
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                break
            raise UserError(f"{path} line {number}: not a JSON record ({e.msg})") from None
        missing = [key for key in ("epoch", "train", "test") if not isinstance(record, dict) or key not in record]
        if missing:
            raise UserError(f"{path} line {number}: not an epoch record (no {missing[0]!r})")
        records.append(record)
    if not records:
        raise UserError(f"{path} is empty: the run has not finished its first epoch yet")
    return records


def logged_flags(train_log: Path) -> dict[str, str]:
    """The flags of train.log's `flags:` line (its latest, for a resumed run) that take a value."""
    if not train_log.is_file():
        return {}
    lines = [line for line in train_log.read_text(errors="replace").splitlines() if line.startswith("flags: ")]
    if not lines:
        return {}
    try:
        words = shlex.split(lines[-1].removeprefix("flags: "))
    except ValueError:             # a line cut short (a full disk): as if there were none
        return {}
    return {word[2:]: following for word, following in zip(words, words[1:])
            if word.startswith("--") and not following.startswith("--")}


def current_summary(folder: Path) -> dict[str, Any] | None:
    """summary.json, unless a resumed run has logged epochs since it was written."""
    path = folder / "summary.json"
    if not path.is_file() or path.stat().st_mtime_ns < (folder / METRICS_FILE).stat().st_mtime_ns:
        return None
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg})") from None
    missing = [k for k in ("selected_by", "metrics", "test_confusion_matrix")
               if not isinstance(summary, dict) or k not in summary]
    if missing:
        raise UserError(f"{path}: not a summary.json written by this project's training (no {missing[0]!r})")
    return summary


def run_names(folders: Sequence[Path]) -> list[str]:
    """Each run's label: its folder's name, or the path as given where two names are the same."""
    names = [f.resolve().name for f in folders]
    return names if len(set(names)) == len(names) else [str(f) for f in folders]


# ---------------------------------------------------------------------- plots
def _run_colour(index: int) -> str:
    return f"C{index % 10}"


def _not_logged(ax) -> None:
    ax.text(0.5, 0.5, NOT_LOGGED, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_yticks([])


def curves_figure(runs: Sequence[Run]) -> Figure:
    figure = new_figure(12, 4.5)
    panels = figure.subplots(1, 2)
    several = len(runs) > 1
    for ax, metric, title in zip(panels, ("loss", "weighted_f1"), ("loss (L_mm)", "weighted F1 (%)")):
        for index, run in enumerate(runs):
            for split in SPLITS:
                y = run.column(f"{split}/{metric}")
                if y is None:
                    continue
                colour = _run_colour(index) if several else SPLIT_COLOURS[split]
                ax.plot(run.x, y, color=colour, linestyle=SPLIT_LINES[split], marker=".",
                        label=f"{run.name} {split}" if several else split)
            chosen = value(run.selected, "valid" if "valid" in run.selected else "test", metric)
            ax.axvline(run.selected_epoch + 1, color=_run_colour(index) if several else "black",
                       linestyle=":", linewidth=1)
            if chosen is not None:
                ax.plot(run.selected_epoch + 1, chosen, marker="*", markersize=14, linestyle="none",
                        color=_run_colour(index) if several else "black",
                        label=f"{run.name} selected" if several else "selected epoch")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    panels[1].legend(fontsize="small")
    return figure


# Rows of modalities.png: title, then (metrics.jsonl column with {m}, split drawn) per line.
MODALITY_ROWS = (
    ("training Shapley score $s_m$", (("modalities/{m}/shapley", "train"),)),
    (r"OGM coefficient $\kappa_m$", (("modalities/{m}/coeff", "train"),)),
    ("conflict fraction", (("modalities/{m}/conflict_frac", "train"),)),
    ("unimodal head accuracy (%)", (("valid/unimodal/{m}/acc", "valid"), ("test/unimodal/{m}/acc", "test"))),
    ("held-out Shapley value (points of acc)", (("valid/shapley/{m}", "valid"), ("test/shapley/{m}", "test"))),
)


def all_modalities(runs: Sequence[Run]) -> str:
    """The modalities of all runs, in the order they first appear."""
    return "".join(dict.fromkeys(m for run in runs for m in run.modals))


def modalities_figure(runs: Sequence[Run]) -> Figure:
    modalities = all_modalities(runs)
    figure = new_figure(4.2 * len(modalities) + 1, 2.6 * len(MODALITY_ROWS))
    grid = np.array(figure.subplots(len(MODALITY_ROWS), len(modalities), sharex=True, squeeze=False))
    several = len(runs) > 1
    for row, (title, lines) in enumerate(MODALITY_ROWS):
        for col, m in enumerate(modalities):
            ax = grid[row, col]
            drawn = False
            for index, run in enumerate(runs):
                for pattern, split in lines:
                    y = run.column(pattern.format(m=m)) if m in run.modals else None
                    if y is None:
                        continue
                    colour = _run_colour(index) if several else SPLIT_COLOURS[split]
                    label = " ".join(([run.name] if several else []) + ([split] if len(lines) > 1 else []))
                    # A row of training-batch means has one line per run: solid, as the test lines.
                    ax.plot(run.x, y, color=colour, linestyle=SPLIT_LINES[split] if len(lines) > 1 else "-",
                            marker=".", label=label or None)
                    drawn = True
                if m in run.modals:
                    ax.axvline(run.selected_epoch + 1, color=_run_colour(index) if several else "black",
                               linestyle=":", linewidth=1)
            if not drawn:
                _not_logged(ax)
            elif ax.get_legend_handles_labels()[1] and col == 0:
                ax.legend(fontsize="x-small")
            if row == 0:
                ax.set_title(f"{m} ({MODALITY_NAMES[m]})")
            if col == 0:
                ax.set_ylabel(title, fontsize="small")
            if row == len(MODALITY_ROWS) - 1:
                ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
    return figure


def normalised_rows(counts: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (the true class's support); NaN for a class absent from the split."""
    support = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, support, out=np.full(counts.shape, np.nan), where=support > 0)


def confusion_figure(runs: Sequence[Run]) -> Figure:
    """The test confusion matrices of `runs` (each has one) side by side."""
    figure = new_figure(5.5 * len(runs), 5.2)
    for ax, run in zip(np.atleast_1d(figure.subplots(1, len(runs))), runs):
        shares, names = normalised_rows(run.confusion), run.class_names
        image = ax.imshow(shares, vmin=0, vmax=1, cmap="Blues")
        for (true, predicted), share in np.ndenumerate(shares):
            if not math.isnan(share):
                ax.text(predicted, true, f"{share:.2f}", ha="center", va="center", fontsize="small",
                        color="white" if share > 0.5 else "black")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), [f"{n} ({s})" for n, s in zip(names, run.confusion.sum(axis=1))])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true (test utterances)")
        ax.set_title(f"{run.name}: test, epoch {run.selected_epoch + 1}", fontsize="medium")
    figure.colorbar(image, ax=figure.axes, shrink=0.8, label="share of the true class")
    return figure


# ---------------------------------------------------------------------- tables
def _number(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame of strings as a markdown table, its index as the first column."""
    header = [frame.index.name or ""] + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join([str(index), *map(str, row)]) + " |" for index, row in zip(frame.index, frame.values)]
    return "\n".join(lines)


def metrics_table(run: Run) -> pd.DataFrame:
    rows = {split: {"loss": _number(value(run.selected, split, "loss"), 4),
                    **{label: _number(value(run.selected, split, key)) for key, label in
                       (("acc", "acc"), ("weighted_f1", "weighted F1"), ("macro_f1", "macro F1"),
                        ("micro_f1", "micro F1"))}}
            for split in SPLITS if split in run.selected}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("split (%)")


def per_class_table(run: Run) -> pd.DataFrame | None:
    logged = {split: value(run.selected, split, "per_class_f1") for split in EVALUATED}
    logged = {split: f1 for split, f1 in logged.items() if f1}
    if not logged:
        return None
    names = list(dict.fromkeys(name for f1 in logged.values() for name in f1))
    return pd.DataFrame({split: [_number(f1.get(name)) for name in names] for split, f1 in logged.items()},
                        index=pd.Index(names, name="class (F1 %)"))


def modality_table(run: Run) -> pd.DataFrame:
    rows = {}
    for m in run.modals:
        probe = run.probes.scores.get(m) if run.probes else None
        rows[f"{m} ({MODALITY_NAMES[m]})"] = {
            **{f"head acc {split}": _number(value(run.selected, split, "unimodal", m, "acc")) for split in EVALUATED},
            "head wF1 test": _number(value(run.selected, "test", "unimodal", m, "weighted_f1")),
            "probe acc": _number(value(probe, "acc")),
            "probe wF1": _number(value(probe, "weighted_f1")),
            **{f"held-out Shapley {split}": _number(value(run.selected, split, "shapley", m)) for split in EVALUATED},
            "training Shapley": _number(value(run.selected, "modalities", m, "shapley"), 4),
            "κ": _number(value(run.selected, "modalities", m, "coeff"), 3),
            "conflict": _number(value(run.selected, "modalities", m, "conflict_frac"), 3),
        }
    frame = pd.DataFrame.from_dict(rows, orient="index").rename_axis("modality")
    # Drop the valid columns of a run without --valid rather than fill them with dashes.
    return frame[[c for c in frame.columns if not (c.endswith(" valid") and "valid" not in run.selected)]]


def coalition_table(run: Run) -> pd.DataFrame | None:
    logged = {split: value(run.selected, split, "coalition_acc") for split in EVALUATED}
    logged = {split: acc for split, acc in logged.items() if acc}
    if not logged:
        return None
    # By size, then in --modals order: the empty coalition first, all modalities last.
    coalitions = sorted(dict.fromkeys(c for acc in logged.values() for c in acc),
                        key=lambda c: (len(c), [run.modals.index(m) for m in c if m in run.modals]))
    return pd.DataFrame({split: [_number(acc.get(c)) for c in coalitions] for split, acc in logged.items()},
                        index=pd.Index([c or "∅ (none)" for c in coalitions], name="coalition (acc %)"))


def comparison_table(runs: Sequence[Run]) -> pd.DataFrame:
    rows = {}
    for run in runs:
        row = {"epoch": str(run.selected_epoch + 1), "selected on": "valid" if "valid" in run.selected else "test",
               "test acc": _number(value(run.selected, "test", "acc")),
               "test wF1": _number(value(run.selected, "test", "weighted_f1")),
               "test macro F1": _number(value(run.selected, "test", "macro_f1"))}
        for m in all_modalities(runs):
            probe = run.probes.scores.get(m) if run.probes else None
            row[f"{m} head acc"] = _number(value(run.selected, "test", "unimodal", m, "acc"))
            row[f"{m} probe acc"] = _number(value(probe, "acc"))
            row[f"{m} Shapley"] = _number(value(run.selected, "test", "shapley", m))
        rows[run.name] = row
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("run (test)")


def run_section(run: Run, probe_note: str) -> list[str]:
    e = run.selected_epoch
    lines = [f"## {run.name}", "",
             f"`{run.dir}`: {run.dataset or 'dataset unknown'}, --modals {run.modals}, {len(run.records)} epochs "
             f"logged; {run.source}.", "",
             f"Selected epoch **{e + 1}** (epoch {e} in {METRICS_FILE}) by {run.selected_by}.", "",
             markdown_table(metrics_table(run)), "", "Per-class F1 at the selected epoch:", ""]
    per_class = per_class_table(run)
    lines += [markdown_table(per_class) if per_class is not None else f"{NOT_LOGGED} (a run from before "
              "per-split diagnostics)", "", "Modalities at the selected epoch: the unimodal heads' and the "
              "linear probes' test scores (%), the held-out Shapley values of accuracy (points), the training "
              "batches' means.", "", markdown_table(modality_table(run)), ""]
    if run.probes:
        p = run.probes
        lines += [f"Probes: logistic regression on best.pt's z_m (epoch {p.epoch + 1}), fitted on {p.n_train} "
                  f"train utterances, scored on {p.n_test} test utterances. Without any signal a probe scores about "
                  f"{p.chance_acc:.2f}% (guessing by the train class shares); always answering the commonest train "
                  f"class scores {p.majority_acc:.2f}%.", ""]
    else:
        lines += [f"Probes: {probe_note}.", ""]
    coalitions = coalition_table(run)
    lines += ["Accuracy of the fused prediction for each coalition of modalities (the others removed):", "",
              markdown_table(coalitions) if coalitions is not None else NOT_LOGGED, ""]
    if coalitions is not None:
        for split in EVALUATED:
            acc, shapley = value(run.selected, split, "coalition_acc"), value(run.selected, split, "shapley")
            if acc and shapley:
                total = sum(shapley.values())
                lines += [f"{split}: the Shapley values sum to {total:.2f} = acc(all) − acc(∅) = "
                          f"{acc.get(''.join(run.modals), math.nan):.2f} − {acc.get('', math.nan):.2f}.", ""]
    return lines


def markdown_report(runs: Sequence[Run], probe_notes: dict[str, str], confusion_drawn: bool) -> str:
    lines = [f"# Training report: {', '.join(run.name for run in runs)}", ""]
    if len(runs) > 1:
        lines += ["Selected epochs, test scores (%), per modality the unimodal head's and the linear probe's "
                  "test accuracy and the held-out Shapley value (points of accuracy):", "",
                  markdown_table(comparison_table(runs)), ""]
    lines += ["![loss and weighted F1 per split over epochs](curves.png)", "",
              "![per modality over epochs](modalities.png)", ""]
    lines += (["![test confusion matrix, normalised per true class](confusion.png)", ""] if confusion_drawn else
              ["No confusion matrix: no run has a summary.json or a checkpoint yet.", ""])
    for run in runs:
        lines += run_section(run, probe_notes.get(run.name, "not run"))
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------- entry point
def write_report(folders: Sequence[Path], out: Path | None, probe: bool, data_dir: str | None) -> int:
    """Read, probe, draw, write; returns the exit status (2 when probes could not run: the rest is written)."""
    runs = [load_run(folder, name) for folder, name in zip(folders, run_names(folders))]
    out = out or folders[0] / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create it ({e.strerror})") from None
    problems, probe_notes = [], {}
    for run in runs:
        best = run.dir / "best.pt"
        if not probe:
            probe_notes[run.name] = "not run (--no-probe)"
        elif not best.is_file():
            probe_notes[run.name] = "no best.pt yet"
            problems.append(f"no {best} for the linear probes")
        else:
            try:
                run.probes = linear_probes(best, data_dir)
            except (UserError, DataError) as e:
                probe_notes[run.name] = f"failed ({e})"
                moved = "; --data-dir DIR gives the data's folder now" if isinstance(e, DataError) else ""
                problems.append(f"linear probes of {run.dir}: {e}{moved}")
    written = ["curves.png", "modalities.png"]
    save_figure(curves_figure(runs), out / "curves.png")
    save_figure(modalities_figure(runs), out / "modalities.png")
    with_matrix = [run for run in runs if run.confusion is not None]
    if with_matrix:
        save_figure(confusion_figure(with_matrix), out / "confusion.png")
        written.append("confusion.png")
    probed = {run.name: run.probes.scores for run in runs if run.probes}
    if probed:
        write_json(out / "probe.json", probed if len(runs) > 1 else probed[runs[0].name])
        written.append("probe.json")
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(markdown_report(runs, probe_notes, bool(with_matrix)))
    written.append("report.md")
    print(f"wrote {', '.join(written)} into {out}")
    if problems:
        print(f"error: {'; '.join(problems)} (--no-probe skips the probes); the plots and report.md are written",
              file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    parser = OneLineParser(prog="python run/report.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", type=Path, help="a training run's --log-dir")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="folder for the report (default RUN_DIR/report; required for several runs)")
    parser.add_argument("--no-probe", action="store_true",
                        help="skip the linear probes (they need best.pt and the data)")
    parser.add_argument("--data-dir", help="for the probes: the folder holding <Dataset>_features/, when it is no "
                                           "longer where the run's saved flags say")
    args = parser.parse_args(argv)
    if len(args.runs) > 1 and args.out is None:
        parser.error("several RUN_DIRs need --out DIR, the folder for their common report")
    try:
        status = write_report(args.runs, args.out, not args.no_probe, args.data_dir)
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        status = 2
    sys.exit(status)
