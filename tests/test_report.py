"""run/report.py: a run folder's plots, tables and linear probes; runs in progress, several runs, bad input."""
import itertools
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from dataloader.datasets import DATASETS, load_conversations
from dataloader.loaders import make_loaders
from dataloader.synthetic import PICKLE_PROTOCOL, generate
from utils.training import main as entry
from utils.training import report
from utils.training.probes import linear_probes

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = {"IEMOCAP": dict(seed=1475, use_modal=True, pareto_gamma=0.2),
            "MELD": dict(seed=67137, pareto_gamma=1.0)}
FAST = ["--batch-size", "4", "--no-cuda"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DIAGNOSTICS = ("unimodal", "coalition_acc", "shapley", "per_class_f1")
# Each modality's worth in the made-up coalition accuracies: an additive game, whose Shapley
# values are these weights exactly.
WEIGHTS = {"l": 20.0, "a": 8.0, "v": 2.0}


def train(dataset, data_dir, log_dir, *flags):
    try:
        entry.main(dataset, DEFAULTS[dataset], ["--data-dir", str(data_dir), "--log-dir", str(log_dir), *FAST, *flags])
    except SystemExit as e:
        assert e.code == 0, e.code
    return log_dir


def diagnostics(modals, class_names, epoch, split):
    """The per-split keys training logs, with numbers that differ by epoch and split (valid 1 above test)."""
    base = epoch + (1.0 if split == "valid" else 0.0)
    coalitions = ["".join(c) for size in range(len(modals) + 1) for c in itertools.combinations(modals, size)]
    return {"unimodal": {m: {"acc": 30 + WEIGHTS[m] + base, "weighted_f1": 25 + WEIGHTS[m] + base,
                             "macro_f1": 20 + WEIGHTS[m] + base} for m in modals},
            "coalition_acc": {c: 10 + sum(WEIGHTS[m] for m in c) + base for c in coalitions},
            "shapley": {m: WEIGHTS[m] for m in modals},
            "per_class_f1": {name: 10.0 * k + base for k, name in enumerate(class_names)}}


def rewrite_records(folder, edit):
    """Apply `edit(split record, epoch, split)` to every evaluated split of metrics.jsonl and of summary.json
    (written after it, as training does)."""
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        for split in ("valid", "test"):
            if split in record:
                edit(record[split], record["epoch"], split)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if (folder / "summary.json").exists():
        summary = json.loads((folder / "summary.json").read_text())
        summary["metrics"] = records[summary["selected_epoch"]]
        (folder / "summary.json").write_text(json.dumps(summary))
    return records


def add_diagnostics(folder, modals, dataset):
    names = DATASETS[dataset].class_names
    return rewrite_records(folder, lambda r, epoch, split: r.update(diagnostics(modals, names, epoch, split)))


def strip_diagnostics(folder):
    return rewrite_records(folder, lambda r, epoch, split: [r.pop(key, None) for key in DIAGNOSTICS])


def make_report(*argv):
    """The report's entry point in-process: its exit status."""
    with pytest.raises(SystemExit) as exit_:
        report.main([str(a) for a in argv])
    return exit_.value.code


def report_cli(*argv):
    return subprocess.run([sys.executable, str(REPO / "run" / "report.py"), *map(str, argv)],
                          capture_output=True, text=True, timeout=300)


def assert_png(path, min_width=400, min_height=250):
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    height, width, channels = matplotlib.image.imread(path).shape
    assert width >= min_width and height >= min_height and channels in (3, 4), (path, width, height)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, meld_dir, iemocap_dir):
    """A finished MELD run with --valid and the per-split diagnostics; a finished IEMOCAP run with
    --modals al, no --valid, from before the diagnostics."""
    root = tmp_path_factory.mktemp("runs")
    meld = train("MELD", meld_dir, root / "meld_dgs", "--epochs", "2", "--valid", "0.25")
    add_diagnostics(meld, "avl", "MELD")
    iemocap = train("IEMOCAP", iemocap_dir, root / "iemocap_al", "--epochs", "2", "--modals", "al")
    strip_diagnostics(iemocap)
    return meld, iemocap


# ------------------------------------------------------------------ finished runs
def test_report_of_a_finished_run_has_real_pngs_and_the_logged_numbers(runs, meld_dir):
    meld, _ = runs
    assert make_report(meld) == 0
    out = meld / "report"
    assert sorted(p.name for p in out.iterdir()) == ["confusion.png", "curves.png", "modalities.png",
                                                     "probe.json", "report.md"]
    for name in ("confusion.png", "curves.png", "modalities.png"):
        assert_png(out / name)
    summary = json.loads((meld / "summary.json").read_text())
    e = summary["selected_epoch"]
    text = (out / "report.md").read_text()
    assert f"Selected epoch **{e + 1}** (epoch {e} in metrics.jsonl) by best validation weighted F1 (--valid)." in text
    assert "the run has finished (summary.json)" in text
    # Per-class F1 of the selected epoch: valid is 1 above test, class k at 10·k + epoch.
    assert f"| fear | {20 + e + 1:.2f} | {20 + e:.2f} |" in text
    assert f"| anger | {60 + e + 1:.2f} | {60 + e:.2f} |" in text
    # Coalition accuracies 10 + Σ weights + epoch; their Shapley values are the weights, summing to 30.
    assert f"| ∅ (none) | {10 + e + 1:.2f} | {10 + e:.2f} |" in text
    assert f"| al | {38 + e + 1:.2f} | {38 + e:.2f} |" in text
    assert f"test: the Shapley values sum to 30.00 = acc(all) − acc(∅) = {40 + e:.2f} − {10 + e:.2f}." in text
    # The modality table: head accuracy (valid, test), head wF1 test, the probe, held-out Shapley (valid, test).
    probes = json.loads((out / "probe.json").read_text())
    assert set(probes) == {"a", "v", "l"} and all(set(p) == {"acc", "weighted_f1"} for p in probes.values())
    text_row = (f"| l (text) | {50 + e + 1:.2f} | {50 + e:.2f} | {45 + e:.2f} | {probes['l']['acc']:.2f} | "
                f"{probes['l']['weighted_f1']:.2f} | 20.00 | 20.00 | ")
    assert text_row in text
    # Fitted on the train part of --valid 0.25 only, scored on the test split.
    loaders = make_loaders(load_conversations("MELD", meld_dir), 4, valid_frac=0.25, seed=67137)
    n_train = sum(len(d) for d in loaders["train"].dataset.dialogues)
    n_test = sum(len(d) for d in loaders["test"].dataset.dialogues)
    assert f"fitted on {n_train} train utterances, scored on {n_test} test utterances" in text
    # Deterministic: the same checkpoint gives the same probes.
    assert linear_probes(meld / "best.pt").scores == probes


def test_a_run_from_before_the_diagnostics_says_not_logged(runs, tmp_path):
    _, iemocap = runs
    assert make_report(iemocap, "--no-probe", "--out", tmp_path) == 0
    text = (tmp_path / "report.md").read_text()
    assert "--modals al" in text and "best test weighted F1 (the reference protocol; no validation split)" in text
    assert "Per-class F1 at the selected epoch:\n\nnot logged (a run from before per-split diagnostics)" in text
    assert "(the others removed):\n\nnot logged" in text
    assert "Probes: not run (--no-probe)." in text
    # No --valid: no valid columns; --modals al: rows a and l only.
    assert ("| modality | head acc test | head wF1 test | probe acc | probe wF1 | held-out Shapley test | "
            "training Shapley | κ | conflict |") in text
    assert "| a (audio) | – |" in text and "| l (text) | – |" in text and "v (visual)" not in text
    assert not (tmp_path / "probe.json").exists()
    run = report.load_run(iemocap, "iemocap_al")
    grid = report.modalities_figure([run]).axes
    assert [ax.get_title() for ax in grid[:2]] == ["a (audio)", "l (text)"]
    not_logged = [i for i, ax in enumerate(grid) if any(t.get_text() == "not logged" for t in ax.texts)]
    assert not_logged == [6, 7, 8, 9]          # rows 4 and 5 (unimodal accuracy, held-out Shapley) of 2 columns
    confusion = report.confusion_figure([run]).axes[0]
    assert [t.get_text() for t in confusion.get_xticklabels()] == list(DATASETS["IEMOCAP"].class_names)
    summary = json.loads((iemocap / "summary.json").read_text())
    counts = np.array(summary["test_confusion_matrix"])
    np.testing.assert_allclose(confusion.images[0].get_array(), counts / counts.sum(1, keepdims=True))


def test_several_runs_are_overlaid_with_a_legend(runs, tmp_path):
    meld, iemocap = runs
    assert make_report(meld, iemocap, "--no-probe", "--out", tmp_path / "both") == 0
    out = tmp_path / "both"
    for name in ("confusion.png", "curves.png", "modalities.png"):
        assert_png(out / name)
    assert_png(out / "confusion.png", min_width=900)         # two matrices side by side
    loaded = [report.load_run(meld, "meld_dgs"), report.load_run(iemocap, "iemocap_al")]
    legend = report.curves_figure(loaded).axes[1].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [
        "meld_dgs train", "meld_dgs valid", "meld_dgs test", "meld_dgs selected",
        "iemocap_al train", "iemocap_al test", "iemocap_al selected"]
    text = (out / "report.md").read_text()
    assert text.startswith("# Training report: meld_dgs, iemocap_al\n")
    assert "| run (test) | epoch | selected on | test acc | test wF1 | test macro F1 | a head acc |" in text
    meld_e = json.loads((meld / "summary.json").read_text())["selected_epoch"]
    assert f"| meld_dgs | {meld_e + 1} | valid |" in text and "| iemocap_al |" in text
    assert text.count("\n## ") == 2


# ------------------------------------------------------------------ runs in progress
def test_a_run_in_progress_is_drawn_from_last_pt_and_no_best_pt_is_exit_2(runs, tmp_path):
    meld, _ = runs
    going = tmp_path / "going"
    going.mkdir()
    os.link(meld / "last.pt", going / "last.pt")
    (going / "train.log").write_text((meld / "train.log").read_text())
    # A resumed run: the summary.json of its first part, older than the epochs logged since.
    (going / "summary.json").write_text(json.dumps({**json.loads((meld / "summary.json").read_text()),
                                                    "selected_by": "the first part's rule"}))
    os.utime(going / "summary.json", (1e9, 1e9))
    # Two finished epochs, and a third being appended right now (no newline yet).
    (going / "metrics.jsonl").write_text((meld / "metrics.jsonl").read_text() + '{"epoch": 2, "train": {"lo')
    done = report_cli(going)
    assert done.returncode == 2
    assert done.stderr == (f"error: no {going / 'best.pt'} for the linear probes (--no-probe skips the probes); "
                           f"the plots and report.md are written\n")
    out = going / "report"
    assert sorted(p.name for p in out.iterdir()) == ["confusion.png", "curves.png", "modalities.png", "report.md"]
    for name in ("confusion.png", "curves.png", "modalities.png"):
        assert_png(out / name)
    best = torch.load(going / "last.pt", map_location="cpu", weights_only=True)["best"]
    text = (out / "report.md").read_text()
    assert "2 epochs logged; a run in progress or stopped (no summary.json of its latest epochs): the best epoch so " \
           "far, from last.pt (saved after epoch 2)." in text
    assert "by best validation weighted F1 (--valid)." in text and "the first part's rule" not in text
    assert f"Selected epoch **{best['epoch'] + 1}** (epoch {best['epoch']} in metrics.jsonl)" in text
    assert "Probes: no best.pt yet." in text
    run = report.load_run(going, "going")
    expected = np.zeros((7, 7), int)
    np.add.at(expected, (best["test_labels"], best["test_preds"]), 1)
    np.testing.assert_array_equal(run.confusion, expected)


def test_without_a_checkpoint_the_selection_comes_from_metrics_jsonl(tmp_path):
    folder = tmp_path / "first_epochs"
    folder.mkdir()
    split = {"loss": 1.0, "acc": 40.0, "macro_f1": 20.0, "micro_f1": 30.0}
    modality = {"loss": 1.0, "shapley": 0.1, "coeff": 0.5, "cos": 0.2, "conflict_frac": 0.25}
    records = [{"epoch": e, "train": {**split, "weighted_f1": 10.0}, "test": {**split, "weighted_f1": f1},
                "modalities": {"l": modality, "a": modality}, "lr": 1e-4, "epoch_time_s": 1.0}
               for e, f1 in enumerate((30.0, 50.0, 50.0))]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert make_report(folder, "--no-probe") == 0
    out = folder / "report"
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "modalities.png", "report.md"]
    text = (out / "report.md").read_text()
    # The first epoch with the best test weighted F1, as training selects.
    assert "Selected epoch **2** (epoch 1 in metrics.jsonl) by best test weighted F1" in text
    assert "No confusion matrix: no run has a summary.json or a checkpoint yet." in text
    assert "| l (text) | – | – | – | – | – | 0.1000 | 0.500 | 0.250 |" in text


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("case", ["not a run folder", "empty", "broken line", "several without --out"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, case):
    folder = tmp_path / "run"
    folder.mkdir()
    metrics = folder / "metrics.jsonl"
    record = json.dumps({"epoch": 0, "train": {}, "test": {}})
    argv = [folder]
    if case == "not a run folder":
        message = f"{folder}: not a run folder (no metrics.jsonl)"
    elif case == "empty":
        metrics.write_text("")
        message = f"{metrics} is empty: the run has not finished its first epoch yet"
    elif case == "broken line":
        metrics.write_text(record + '\n{"epoch": 1, \n' + record + "\n")
        message = f"{metrics} line 2: not a JSON record (Expecting property name enclosed in double quotes)"
    else:
        argv = [folder, folder]
        message = "several RUN_DIRs need --out DIR, the folder for their common report (see --help)"
    done = report_cli(*argv)
    assert (done.returncode, done.stderr, done.stdout) == (2, f"error: {message}\n", "")
    assert not (folder / "report").exists()


def test_probes_of_a_run_whose_data_moved_say_which_flag_helps(runs, tmp_path, capsys):
    meld, _ = runs
    nowhere = tmp_path / "nowhere"
    assert make_report(meld, "--out", tmp_path / "out", "--data-dir", nowhere) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: linear probes of {meld}: MELD data not found: missing "
                          f"{nowhere / 'MELD_features' / 'MELD_features_raw1.pkl'} ")
    assert err.endswith("; --data-dir DIR gives the data's folder now (--no-probe skips the probes); the plots and "
                        "report.md are written\n") and err.count("\n") == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["confusion.png", "curves.png", "modalities.png",
                                                                    "report.md"]


# ------------------------------------------------------------------ probes
def test_probes_score_a_modality_without_signal_near_chance(tmp_path):
    generate("IEMOCAP", tmp_path / "data", scale=0.1, seed=0)
    # The visual features replaced by seeded noise: nothing there says the emotion.
    path = tmp_path / "data" / "IEMOCAP_features" / "IEMOCAP_features.pkl"
    with open(path, "rb") as f:
        fields = list(pickle.load(f, encoding="latin1"))
    rng = np.random.default_rng(0)
    fields[5] = {vid: [rng.standard_normal(342).astype(np.float32) for _ in rows] for vid, rows in fields[5].items()}
    with open(path, "wb") as f:
        pickle.dump(tuple(fields), f, protocol=PICKLE_PROTOCOL)
    run = train("IEMOCAP", tmp_path / "data", tmp_path / "run", "--epochs", "1")
    result = linear_probes(run / "best.pt")
    data = load_conversations("IEMOCAP", tmp_path / "data")
    y_train, y_test = (np.concatenate([d.labels for d in data.splits[s]]) for s in ("train", "test"))
    train_shares, test_shares = (np.bincount(y, minlength=6) / len(y) for y in (y_train, y_test))
    chance = 100 * train_shares @ test_shares
    assert (result.n_train, result.n_test) == (len(y_train), len(y_test))
    assert result.chance_acc == pytest.approx(chance)
    assert result.majority_acc == pytest.approx(100 * test_shares[train_shares.argmax()])
    acc = {m: s["acc"] for m, s in result.scores.items()}
    assert abs(acc["v"] - chance) < 8                      # the noise: about what guessing by class shares gets
    assert acc["v"] < 100 * test_shares.max()             # below always answering the test split's commonest class
    assert min(acc["a"], acc["l"]) > acc["v"] + 15        # the informative modalities, far above it
    assert min(acc["a"], acc["l"]) > chance + 15
