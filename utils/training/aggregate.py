"""A sweep's tables and plots, from its runs' summary.json and metrics.jsonl:

  DIR/results.csv   one row per finished run: method, grid values, seed, selected epoch and how it
                    was selected, test acc / weighted F1 / macro F1 / micro F1, per modality the
                    unimodal head's accuracy and the held-out Shapley value, per-class F1, mean epoch time
  DIR/results.md    per method and grid point: n and mean ± std over seeds; each method's paired
                    difference from the baseline over the seeds both have (95% t interval, paired t-test)
  DIR/plots/        test_metrics.png, unimodal_acc.png, weighted_f1_curves.png
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy import stats

from dataloader.datasets import MODALITY_NAMES
from utils.errors import UserError
from utils.files import atomic_path
from utils.training.figures import new_figure, save_figure
from utils.training.runlog import METRICS_FILE

HEADLINE = (("weighted_f1", "weighted F1"), ("acc", "acc"), ("macro_f1", "macro F1"))
CURVE_SPLITS = ("valid", "test")
CONFIDENCE = 0.95
BASELINES = ("joint", "plain")        # the default baseline: the first of these that was swept


def default_baseline(methods: Sequence[str] | set[str]) -> str | None:
    return next((method for method in BASELINES if method in methods), None)


# ---------------------------------------------------------------------- reading the runs
def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None


def read_epochs(path: Path) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                raise UserError(f"{path} line {number}: not a JSON record") from None
    return records


def modalities_of(columns: Sequence[str], prefix: str) -> list[str]:
    """The modalities with a `prefix<m>` column, text first (l, a, v)."""
    return [m for m in MODALITY_NAMES if f"{prefix}{m}" in columns]


def in_order(modalities: Sequence[str]) -> list[str]:
    return [m for m in MODALITY_NAMES if m in modalities]


def run_row(entry: dict[str, Any], summary: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    record = summary["metrics"]
    test = record["test"]
    row = {"run": entry["name"], "method": entry["method"], **entry["grid"], "seed": entry["seed"],
           "selected_epoch": summary["selected_epoch"], "selected_on": "valid" if "valid" in record else "test",
           "epochs_logged": len(records)}
    row.update({f"test_{key}": test[key] for key in ("weighted_f1", "acc", "macro_f1", "micro_f1")})
    if "valid" in record:
        row["valid_weighted_f1"] = record["valid"]["weighted_f1"]
    for m in in_order(test.get("unimodal", {})):
        row[f"unimodal_acc_{m}"] = test["unimodal"][m]["acc"]
    for m in in_order(test.get("shapley", {})):
        row[f"shapley_{m}"] = test["shapley"][m]
    for name, value in test.get("per_class_f1", {}).items():
        row[f"f1_{name}"] = value
    times = [r["epoch_time_s"] for r in records if isinstance(r.get("epoch_time_s"), (int, float))]
    row["mean_epoch_time_s"] = float(np.mean(times)) if times else math.nan
    return row


def read_sweep(out: Path, definition: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame, list[str], Counter]:
    """(one row per finished run, weighted F1 per run, split and epoch, the unfinished runs'
    names, how many runs each selection rule selected)."""
    rows, curves, unfinished, selected_by = [], [], [], Counter()
    for entry in definition["runs"]:
        folder = out / "runs" / entry["name"]
        if not (folder / "summary.json").is_file():
            unfinished.append(entry["name"])
            continue
        summary = read_json(folder / "summary.json")
        records = read_epochs(folder / METRICS_FILE)
        rows.append(run_row(entry, summary, records))
        selected_by[summary["selected_by"]] += 1
        keys = {"method": entry["method"], **entry["grid"], "seed": entry["seed"]}
        curves += [{**keys, "split": split, "epoch": r["epoch"], "weighted_f1": r[split]["weighted_f1"]}
                   for r in records for split in CURVE_SPLITS if split in r]
    return pd.DataFrame(rows), pd.DataFrame(curves), unfinished, selected_by


# ---------------------------------------------------------------------- statistics
def groups(runs: pd.DataFrame, keys: list[str]) -> list[tuple[tuple, pd.DataFrame]]:
    """The rows of each (method, grid values), in the order they first appear."""
    order = list(dict.fromkeys(map(tuple, runs[keys].astype(str).values)))
    by_key = {tuple(str(v) for v in key): rows for key, rows in runs.groupby(keys, sort=False)}
    return [(key, by_key[key]) for key in order]


def paired(values: pd.Series, baseline: pd.Series) -> dict[str, float]:
    """method − baseline over the seeds both have: n, mean, the 95% t interval and the paired
    t-test's p-value (NaN where n < 2, or where all differences are equal)."""
    shared = values.index.intersection(baseline.index)
    a, b = values.loc[shared].to_numpy(float), baseline.loc[shared].to_numpy(float)
    n = len(shared)
    result = {"n": n, "mean": float(np.mean(a - b)) if n else math.nan, "low": math.nan, "high": math.nan,
              "p": math.nan}
    if n >= 2:
        spread = float(np.std(a - b, ddof=1))
        half = stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * spread / math.sqrt(n)
        result.update(low=result["mean"] - half, high=result["mean"] + half)
        if spread > 0:
            result["p"] = float(stats.ttest_rel(a, b).pvalue)
    return result


def mean_std(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "–"
    spread = f"{values.std(ddof=1):.2f}" if len(values) > 1 else "n/a"
    return f"{values.mean():.2f} ± {spread}"


def difference(result: dict[str, float]) -> list[str]:
    if result["n"] == 0:
        return ["–", "–"]
    if result["n"] < 2:
        return [f"{result['mean']:+.2f} [n/a]", "n/a"]
    p = "n/a (no spread)" if math.isnan(result["p"]) else f"{result['p']:.3g}"
    return [f"{result['mean']:+.2f} [{result['low']:+.2f}, {result['high']:+.2f}]", p]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + \
           ["| " + " | ".join(row) + " |" for row in rows]


# ---------------------------------------------------------------------- the tables
def results_markdown(definition: dict[str, Any], runs: pd.DataFrame, unfinished: list[str],
                     selected_by: Counter, baseline: str | None) -> str:
    grid = list(definition["grid"])
    total = len(definition["runs"])
    methods = list(dict.fromkeys(entry["method"] for entry in definition["runs"]))
    lines = [f"# Sweep: {definition['Dataset']}", "",
             f"{len(runs)} of {total} runs finished. Training flags of every run: `{definition['training_flags']}`; "
             f"methods: " + ", ".join(f"{m} (`{definition['methods'][m]}`)" if definition["methods"].get(m)
                                      else f"{m} (no flag)" for m in methods) + "."]
    if grid:
        lines.append(f"Grid: {', '.join(f'`--{name}`' for name in grid)}.")
    if selected_by:
        lines.append("Epochs selected by " + "; ".join(f"{rule}: {n} run{'s' * (n > 1)}"
                                                       for rule, n in selected_by.items()) + ".")
    if unfinished:
        lines.append(f"Not finished, left out: {', '.join(unfinished)}.")
    if runs.empty:
        return "\n".join(lines) + "\n"
    keys = ["method", *grid]
    by_group = groups(runs, keys)
    unimodal = modalities_of(runs.columns, "unimodal_acc_")
    shapley = modalities_of(runs.columns, "shapley_")
    lines += ["", "## Test split, mean ± std over seeds", "",
              *table([*keys, "n", *(f"{label}" for _, label in HEADLINE),
                      *(f"unimodal acc {MODALITY_NAMES[m]}" for m in unimodal)],
                     [[*key, str(len(rows)), *(mean_std(rows[f"test_{metric}"]) for metric, _ in HEADLINE),
                       *(mean_std(rows[f"unimodal_acc_{m}"]) for m in unimodal)] for key, rows in by_group])]
    if shapley:
        lines += ["", "Held-out Shapley value of each modality on the test split (its share of the test "
                      "accuracy over the empty coalition's, in percentage points), mean ± std:", "",
                  *table([*keys, "n", *(MODALITY_NAMES[m] for m in shapley)],
                         [[*key, str(len(rows)), *(mean_std(rows[f"shapley_{m}"]) for m in shapley)]
                          for key, rows in by_group])]
    lines += ["", *paired_section(by_group, keys, baseline)]
    return "\n".join(lines) + "\n"


def paired_section(by_group: list[tuple[tuple, pd.DataFrame]], keys: list[str], baseline: str | None) -> list[str]:
    if baseline is None:
        return ["No paired comparison: neither joint nor plain was swept (--baseline METHOD picks one)."]
    reference = {key[1:]: rows.set_index("seed") for key, rows in by_group if key[0] == baseline}
    body = []
    for key, rows in by_group:
        if key[0] == baseline:
            continue
        base = reference.get(key[1:])
        mine = rows.set_index("seed")
        results = [paired(mine[f"test_{metric}"], base[f"test_{metric}"]) if base is not None
                   else paired(mine[f"test_{metric}"], pd.Series(dtype=float)) for metric, _ in HEADLINE]
        body.append([*key, str(results[0]["n"]), *(cell for result in results for cell in difference(result))])
    if not body:
        return [f"No paired comparison: {baseline} is the only method."]
    return [f"## Paired difference from {baseline} (same seeds; test split)", "",
            f"Method − {baseline} over the seeds both ran; [{CONFIDENCE:.0%} t confidence interval]; p: paired "
            f"t-test (scipy.stats.ttest_rel); n/a where fewer than 2 seeds are shared.", "",
            *table([*keys, "n pairs", *(c for _, label in HEADLINE for c in (f"Δ {label} [95% CI]", "p"))], body)]


# ---------------------------------------------------------------------- the plots
def label_of(key: tuple, keys: list[str]) -> str:
    return " ".join([key[0], *(f"{name}={value}" for name, value in zip(keys[1:], key[1:]))])


def bars_figure(by_group: list[tuple[tuple, pd.DataFrame]], keys: list[str], columns: Sequence[tuple[str, str]],
                ylabel: str, title: str) -> Figure:
    """Grouped bars: per method and grid point, the mean of each column, the std as error bar."""
    figure = new_figure(max(6.0, 1.2 * len(by_group) * len(columns) / 2 + 2), 4.2)
    ax = figure.subplots()
    width = 0.8 / len(columns)
    x = np.arange(len(by_group))
    for i, (column, label) in enumerate(columns):
        means = [rows[column].mean() for _, rows in by_group]
        spreads = [rows[column].std(ddof=1) if rows[column].count() > 1 else 0.0 for _, rows in by_group]
        ax.bar(x + (i - (len(columns) - 1) / 2) * width, means, width, yerr=spreads, capsize=3, label=label)
    ax.set_xticks(x, [label_of(key, keys) for key, _ in by_group], rotation=20 if len(by_group) > 5 else 0)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return figure


def curves_figure(curves: pd.DataFrame, keys: list[str], order: list[tuple]) -> Figure:
    """Weighted F1 over epochs per method and grid point: the mean over seeds, ± std as a band."""
    splits = [s for s in CURVE_SPLITS if s in set(curves["split"])]
    figure = new_figure(6.0 * len(splits), 4.2)
    for ax, split in zip(np.atleast_1d(figure.subplots(1, len(splits))), splits):
        rows = curves[curves["split"] == split]
        by_key = {tuple(str(v) for v in key): part for key, part in rows.groupby(keys, sort=False)}
        for key in order:
            if key not in by_key:
                continue
            per_epoch = by_key[key].groupby("epoch")["weighted_f1"]
            epochs = np.array(per_epoch.mean().index) + 1
            mean, spread = per_epoch.mean().to_numpy(), per_epoch.std(ddof=1).fillna(0.0).to_numpy()
            line, = ax.plot(epochs, mean, label=label_of(key, keys))
            ax.fill_between(epochs, mean - spread, mean + spread, color=line.get_color(), alpha=0.2)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"{split} weighted F1 (%)")
        ax.set_title(f"{split}: mean ± std over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return figure


def write_plots(out: Path, runs: pd.DataFrame, curves: pd.DataFrame, keys: list[str]) -> None:
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    by_group = groups(runs, keys)
    save_figure(bars_figure(by_group, keys, [(f"test_{m}", label) for m, label in HEADLINE], "test (%)",
                            "test metrics: mean ± std over seeds"), plots / "test_metrics.png")
    unimodal = modalities_of(runs.columns, "unimodal_acc_")
    if unimodal:
        save_figure(bars_figure(by_group, keys, [(f"unimodal_acc_{m}", MODALITY_NAMES[m]) for m in unimodal],
                                "test accuracy (%)", "unimodal heads: mean ± std over seeds"),
                    plots / "unimodal_acc.png")
    if not curves.empty:
        save_figure(curves_figure(curves, keys, [key for key, _ in by_group]), plots / "weighted_f1_curves.png")


def aggregate(out: Path, baseline: str | None) -> Path:
    """Write results.csv, results.md and plots/ of the sweep in `out`; the path of results.md."""
    definition = read_json(out / "sweep.json")
    runs, curves, unfinished, selected_by = read_sweep(out, definition)
    keys = ["method", *definition["grid"]]
    try:
        with atomic_path(out / "results.csv") as tmp:
            runs.to_csv(tmp, index=False)
        with atomic_path(out / "results.md") as tmp:
            tmp.write_text(results_markdown(definition, runs, unfinished, selected_by, baseline))
        if not runs.empty:
            write_plots(out, runs, curves, keys)
    except OSError as e:
        raise UserError(f"cannot write the tables into {out} ({e.strerror})") from None
    return out / "results.md"
