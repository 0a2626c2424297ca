"""run/sweep.py: methods × seeds of training runs into tables; reruns, interruptions, Ray, bad input."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dataloader.synthetic import generate
from utils.training import sweep as sweep_module

REPO = Path(__file__).resolve().parents[1]
TRAINING = ["--epochs", "3", "--batch-size", "4", "--no-cuda"]
METHODS = ["joint", "dgs"]
SEEDS = ["1", "2"]
# Student's t quantile t(0.975, df=1), for the 95% interval of two paired seeds.
T_975_DF1 = 12.706204736174704
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Synthetic IEMOCAP at the smallest useful size: 6 train (1 of them held out), 2 test dialogues."""
    root = tmp_path_factory.mktemp("sweep-data")
    generate("IEMOCAP", root, scale=0.05, seed=0)
    return root


def sweep_argv(data_dir, out, *extra, methods=METHODS, seeds=SEEDS, training=TRAINING):
    return ["--Dataset", "IEMOCAP", "--data-dir", str(data_dir), "--methods", *methods, "--seeds", *seeds,
            "--out", str(out), *extra, "--", *training]


def run_sweep(argv, **kwargs):
    """The sweep as a user starts it, one thread per run."""
    return subprocess.run([sys.executable, str(REPO / "run" / "sweep.py"), *map(str, argv)], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """joint and dgs × seeds 1, 2, uninterrupted, two runs at a time."""
    out = tmp_path_factory.mktemp("sweep-reference") / "sweep"
    result = run_sweep(sweep_argv(data_dir, out, "--workers", "2"))
    assert result.returncode == 0, result.stderr
    return out, result


def table_cells(text, heading):
    """The table under `heading` in results.md: its header, and its rows as lists of cells."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[0], rows[2:]


def markdown_table(text, heading):
    """The table under `heading` in results.md as a list of {column: cell} (its columns named apart)."""
    header, body = table_cells(text, heading)
    return [dict(zip(header, row)) for row in body]


def mean_std(cell):
    mean, std = cell.split(" ± ")
    return float(mean), float(std)


def without_times(frame):
    return frame.drop(columns="mean_epoch_time_s")


def test_tables_agree_with_the_runs(reference):
    out, result = reference
    rows = pd.read_csv(out / "results.csv")
    assert list(rows["run"]) == ["joint-seed1", "joint-seed2", "dgs-seed1", "dgs-seed2"]
    for _, row in rows.iterrows():
        summary = json.loads((out / "runs" / row["run"] / "summary.json").read_text())
        test = summary["metrics"]["test"]
        assert row["selected_epoch"] == summary["selected_epoch"] and row["selected_on"] == "valid"
        assert row["test_weighted_f1"] == test["weighted_f1"] and row["test_acc"] == test["acc"]
        assert row["unimodal_acc_a"] == test["unimodal"]["a"]["acc"]
        assert row["shapley_l"] == test["shapley"]["l"]
        assert row["f1_fru"] == test["per_class_f1"]["fru"]
        assert row["epochs_logged"] == 3
        flags = (out / "runs" / row["run"] / "train.log").read_text().splitlines()[1]
        assert f"--seed {row['seed']} --valid 0.2" in flags
        assert ("--no-unimodal-loss" in flags) == (row["method"] == "joint")

    text = (out / "results.md").read_text()
    assert "4 of 4 runs finished" in text
    assert "Epochs selected by best validation weighted F1 (--valid): 4 runs." in text
    table = markdown_table(text, "## Test split")
    assert [r["method"] for r in table] == METHODS
    columns = {"weighted F1": "test_weighted_f1", "acc": "test_acc", "macro F1": "test_macro_f1",
               "unimodal acc text": "unimodal_acc_l", "unimodal acc audio": "unimodal_acc_a",
               "unimodal acc visual": "unimodal_acc_v"}
    for line in table:
        values = rows[rows["method"] == line["method"]]
        assert line["n"] == "2"
        for column, name in columns.items():
            x = values[name].to_numpy(np.float64)
            mean, std = mean_std(line[column])
            assert mean == pytest.approx(x.mean(), abs=0.005)
            assert std == pytest.approx(math.sqrt(((x - x.mean()) ** 2).sum() / (len(x) - 1)), abs=0.005)

    header, paired = table_cells(text, "## Paired difference from joint")
    assert header == ["method", "n pairs", "Δ weighted F1 [95% CI]", "p", "Δ acc [95% CI]", "p",
                      "Δ macro F1 [95% CI]", "p"]
    assert [row[:2] for row in paired] == [["dgs", "2"]]
    for column, name in ((2, "test_weighted_f1"), (4, "test_acc"), (6, "test_macro_f1")):
        dgs = rows[rows["method"] == "dgs"].set_index("seed")[name]
        joint = rows[rows["method"] == "joint"].set_index("seed")[name]
        d = (dgs - joint.loc[dgs.index]).to_numpy(np.float64)
        sd = abs(d[0] - d[1]) / math.sqrt(2)
        half = T_975_DF1 * sd / math.sqrt(2)
        t = d.mean() / (sd / math.sqrt(2))
        p = 1 - 2 / math.pi * math.atan(abs(t))      # two-sided, Student's t with 1 degree of freedom (Cauchy)
        cell = re.fullmatch(r"([+-]\d+\.\d\d) \[([+-]\d+\.\d\d), ([+-]\d+\.\d\d)\]", paired[0][column])
        assert cell, paired[0]
        assert [float(v) for v in cell.groups()] == pytest.approx([d.mean(), d.mean() - half, d.mean() + half], abs=0.005)
        assert float(paired[0][column + 1]) == pytest.approx(p, rel=0.01)

    for name in ("test_metrics.png", "unimodal_acc.png", "weighted_f1_curves.png"):
        assert (out / "plots" / name).read_bytes()[:8] == PNG_SIGNATURE
    assert "[4/4]" in result.stdout and "local backend: 2 workers, 1 thread per run" in result.stdout


def test_rerun_trains_nothing(reference, data_dir):
    out, _ = reference
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in (out / "runs").rglob("*") if p.is_file()}
    tables = (out / "results.md").read_text()
    result = run_sweep(sweep_argv(data_dir, out, "--workers", "2"))
    assert result.returncode == 0, result.stderr
    assert "4 runs in" in result.stdout and "4 finished before, 0 to resume, 0 to start" in result.stdout
    assert "[1/" not in result.stdout
    after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in (out / "runs").rglob("*") if p.is_file()}
    assert after == before
    assert (out / "results.md").read_text() == tables


def test_aggregate_alone_rewrites_the_tables(reference):
    out, _ = reference
    tables = (out / "results.md").read_text()
    (out / "results.md").unlink()
    (out / "plots" / "test_metrics.png").unlink()
    with pytest.raises(SystemExit) as exit_:
        sweep_module.main(["--aggregate", str(out), "--baseline", "dgs"])
    assert exit_.value.code == 0
    text = (out / "results.md").read_text()
    assert "## Paired difference from dgs" in text
    assert markdown_table(text, "## Test split") == markdown_table(tables, "## Test split")
    assert (out / "plots" / "test_metrics.png").is_file()
    with pytest.raises(SystemExit) as exit_:
        sweep_module.main(["--aggregate", str(out)])
    assert exit_.value.code == 0
    assert (out / "results.md").read_text() == tables


def test_an_interrupted_sweep_continues_to_the_same_tables(reference, data_dir, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "sweep"
    command = [sys.executable, str(REPO / "run" / "sweep.py"), *sweep_argv(data_dir, out, "--workers", "2")]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Stopped after the first runs have finished and a later one has saved an epoch.
    deadline = time.monotonic() + 300
    while not ((out / "runs" / "joint-seed1" / "summary.json").is_file()
               and (out / "runs" / "dgs-seed1" / "last.pt").is_file()):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "sweep stopped by SIGINT" in stderr and "rerun the same command to go on" in stderr
    stopped = [name for name in ("dgs-seed1", "dgs-seed2") if not (out / "runs" / name / "summary.json").exists()]
    assert "dgs-seed1" in stopped, stdout
    assert "interrupted (" in (out / "runs" / "dgs-seed1" / "train.log").read_text()
    finished = {p: p.stat().st_mtime_ns for name in ("joint-seed1", "joint-seed2")
                for p in (out / "runs" / name).iterdir()}

    result = run_sweep(sweep_argv(data_dir, out, "--workers", "2"))
    assert result.returncode == 0, result.stderr
    assert "2 finished before" in result.stdout
    assert "resumed from" in (out / "runs" / "dgs-seed1" / "train.log").read_text()
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert (out / "results.md").read_text() == (ref_out / "results.md").read_text()
    pd.testing.assert_frame_equal(without_times(pd.read_csv(out / "results.csv")),
                                  without_times(pd.read_csv(ref_out / "results.csv")))


def test_a_run_stopped_before_its_first_checkpoint_is_started_again(reference, data_dir, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "sweep"
    # What a run killed in its first epoch leaves: the log's first lines and an empty metrics.jsonl.
    folder = out / "runs" / "joint-seed1"
    folder.mkdir(parents=True)
    (folder / "train.log").write_text("\n".join((ref_out / "runs" / "joint-seed1" / "train.log")
                                                .read_text().splitlines()[:2]) + "\n")
    (folder / "metrics.jsonl").touch()
    shutil.copy(ref_out / "sweep.json", out / "sweep.json")
    result = run_sweep(sweep_argv(data_dir, out, "--workers", "2", methods=["joint"], seeds=["1"]))
    assert result.returncode == 0, result.stderr
    assert "1 to start (1 of them again, stopped before their first last.pt)" in result.stdout
    assert (folder / "train.log").read_text().count("flags: ") == 1
    summary, expected = (json.loads((f / "summary.json").read_text()) for f in (folder, ref_out / "runs" / "joint-seed1"))
    assert (summary["selected_epoch"], summary["metrics"]["test"]) == (expected["selected_epoch"], expected["metrics"]["test"])


def test_a_failed_run_is_reported_and_the_sweep_goes_on(reference, data_dir, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "sweep"
    # A run whose last.pt was damaged: its --resume fails, the other run trains.
    broken = out / "runs" / "joint-seed2"
    shutil.copytree(ref_out / "runs" / "joint-seed2", broken)
    (broken / "summary.json").unlink()
    (broken / "last.pt").unlink()
    (broken / "last.pt").write_text("not a checkpoint")
    shutil.copy(ref_out / "sweep.json", out / "sweep.json")
    result = run_sweep(sweep_argv(data_dir, out, "--workers", "1", methods=["joint"]))
    assert result.returncode == 1
    assert "1 finished before" not in result.stdout and "1 to resume, 1 to start" in result.stdout
    failed = next(line for line in result.stdout.splitlines() if "joint-seed2" in line)
    assert re.fullmatch(r"\[\d/2\] joint-seed2: FAILED \(exit status 2\) after \d+ s: error: checkpoint "
                        r".*/joint-seed2/last\.pt: not a PyTorch checkpoint \(neither torch\.save's zip format "
                        r"nor a pickle\)", failed), failed
    assert re.search(r"\[\d/2\] joint-seed1: finished in \d+ s, test weighted F1 ", result.stdout)
    assert result.stderr.splitlines()[-1].startswith("error: 1 of 2 runs failed: joint-seed2 (their stderr: ")
    text = (out / "results.md").read_text()
    assert "1 of 4 runs finished" in text and "Not finished, left out: joint-seed2, dgs-seed1, dgs-seed2." in text
    assert list(pd.read_csv(out / "results.csv")["run"]) == ["joint-seed1"]


def test_grid_names_flags_and_growth(data_dir, tmp_path):
    out = tmp_path / "sweep"
    training = ["--epochs", "1", "--batch-size", "4", "--no-cuda", "--valid", "0"]
    first = run_sweep(sweep_argv(data_dir, out, "--grid", "alpha_=0.30", "--drop-checkpoints", methods=["dgs"],
                                 seeds=["1"], training=training))
    assert first.returncode == 0, first.stderr
    run = out / "runs" / "dgs-alpha_0.3-seed1"
    assert "--alpha_ 0.3 " in (run / "train.log").read_text().splitlines()[1]
    assert not list(run.glob("*.pt"))
    log = (run / "train.log").read_text()
    # The grid grows by a value: only the new point trains.
    second = run_sweep(sweep_argv(data_dir, out, "--grid", "alpha_=0.3,0.9", "--drop-checkpoints", methods=["dgs"],
                                  seeds=["1"], training=training))
    assert second.returncode == 0, second.stderr
    assert "2 runs in" in second.stdout and "1 finished before, 0 to resume, 1 to start" in second.stdout
    assert (run / "train.log").read_text() == log
    definition = json.loads((out / "sweep.json").read_text())
    assert [r["name"] for r in definition["runs"]] == ["dgs-alpha_0.3-seed1", "dgs-alpha_0.9-seed1"]
    assert definition["grid"] == ["alpha_"] and definition["training_flags"] == "--no-cuda --batch-size 4 --epochs 1 --valid 0.0"
    rows = pd.read_csv(out / "results.csv")
    assert list(rows["alpha_"]) == [0.3, 0.9] and set(rows["selected_on"]) == {"test"}
    text = (out / "results.md").read_text()
    assert [(r["method"], r["alpha_"], r["n"]) for r in markdown_table(text, "## Test split")] == \
        [("dgs", "0.3", "1"), ("dgs", "0.9", "1")]
    assert "Epochs selected by best test weighted F1 (the reference protocol; no validation split): 2 runs." in text
    assert "No paired comparison: neither joint nor plain was swept (--baseline METHOD picks one)." in text


def test_ray_backend_gives_the_same_rows(reference, data_dir, tmp_path):
    pytest.importorskip("ray")
    ref_out, _ = reference
    out = tmp_path / "sweep"
    result = run_sweep(sweep_argv(data_dir, out, "--backend", "ray", "--workers", "2"))
    assert result.returncode == 0, result.stderr
    assert "up to 2 runs at a time, 1 CPU each" in result.stdout
    pd.testing.assert_frame_equal(without_times(pd.read_csv(out / "results.csv")),
                                  without_times(pd.read_csv(ref_out / "results.csv")))
    assert (out / "results.md").read_text() == (ref_out / "results.md").read_text()


def one_line_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        sweep_module.main([str(a) for a in argv])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_bad_input_is_one_line(capsys, data_dir, tmp_path):
    out = tmp_path / "new"
    cases = {
        "error: argument --methods: invalid choice: 'nope' (choose from 'joint', 'plain', 'ogm_ge', 'mmpareto', "
        "'dgs') (see --help)": sweep_argv(data_dir, out, methods=["dgs", "nope"]),
        "error: argument --seeds: expected at least one argument (see --help)": sweep_argv(data_dir, out, seeds=[]),
        "error: --grid nope=1,2: the IEMOCAP training script has no flag --nope":
            sweep_argv(data_dir, out, "--grid", "nope=1,2"),
        "error: --grid alpha_=0.3,x: argument --alpha_: invalid float value: 'x'":
            sweep_argv(data_dir, out, "--grid", "alpha_=0.3,x"),
        "error: --grid modulation=OGM: the sweep sets --modulation by --methods":
            sweep_argv(data_dir, out, "--grid", "modulation=OGM"),
        "error: --grid alpha=1,2: --alpha has no effect on training (see its --help)":
            sweep_argv(data_dir, out, "--grid", "alpha=1,2"),
        "error: training flags after --: the sweep sets --seed itself":
            sweep_argv(data_dir, out, training=[*TRAINING, "--seed", "3"]),
        "error: training flags after --: the sweep sets --no-shapley by --methods":
            sweep_argv(data_dir, out, training=[*TRAINING, "--no-shapley"]),
        "error: training flags after --: unrecognized arguments: --nope":
            sweep_argv(data_dir, out, training=[*TRAINING, "--nope"]),
        "error: --seeds 1 1: give each seed once": sweep_argv(data_dir, out, seeds=["1", "1"]),
        "error: --baseline plain: not a method of this sweep": sweep_argv(data_dir, out, "--baseline", "plain"),
        "error: a sweep needs --seeds, --out (or --aggregate DIR)": ["--Dataset", "IEMOCAP", "--methods", "dgs"],
        f"error: --aggregate {out}: no sweep.json there, so no sweep": ["--aggregate", out],
    }
    for message, argv in cases.items():
        assert one_line_error(capsys, argv) == message
    assert not out.exists()
    holds_files = tmp_path / "holds-files"
    holds_files.mkdir()
    (holds_files / "notes.txt").write_text("mine")
    assert one_line_error(capsys, sweep_argv(data_dir, holds_files)) == \
        f"error: --out {holds_files}: holds files but no sweep.json, so no sweep: pick a new or empty folder"
    assert sorted(p.name for p in holds_files.iterdir()) == ["notes.txt"]


def test_an_out_folder_of_another_sweep_is_refused(capsys, reference, data_dir):
    out, _ = reference
    before = (out / "sweep.json").read_text()
    other = ["--epochs", "2", "--batch-size", "4", "--no-cuda"]
    assert one_line_error(capsys, sweep_argv(data_dir, out, training=other)) == \
        (f"error: --out {out} holds another sweep: its training flags are `--no-cuda --batch-size 4 --epochs 3 "
         f"--valid 0.2`, this command's training flags are `--no-cuda --batch-size 4 --epochs 2 --valid 0.2`; pick "
         f"another --out, or rerun that sweep's command")
    assert one_line_error(capsys, sweep_argv(data_dir, out, "--grid", "alpha_=0.3")).startswith(
        f"error: --out {out} holds another sweep: its grid flags are none, this command's grid flags are alpha_;")
    assert (out / "sweep.json").read_text() == before


def test_a_run_folder_with_other_flags_is_refused(capsys, reference, data_dir, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "sweep"
    shutil.copytree(ref_out / "runs" / "joint-seed1", out / "runs" / "joint-seed1")
    log = out / "runs" / "joint-seed1" / "train.log"
    log.write_text(log.read_text().replace("--lr 0.0001", "--lr 0.001"))
    shutil.copy(ref_out / "sweep.json", out / "sweep.json")
    assert one_line_error(capsys, sweep_argv(data_dir, out, methods=["joint"], seeds=["1"])) == \
        (f"error: {out / 'runs' / 'joint-seed1'} holds a run trained with --lr 0.001, where this sweep gives --lr "
         f"0.0001: remove that folder, or use another --out")
    assert sorted(p.name for p in out.iterdir()) == [".lock", "runs", "sweep.json"]
    assert (out / "sweep.json").read_text() == (ref_out / "sweep.json").read_text()
