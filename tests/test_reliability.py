"""What a run keeps survives kills, signals, full disks and bad or foreign checkpoints, or the run
stops with one line: nothing kept is lost or silently wrong."""
import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from model import checkpoint
from model.checkpoint import CheckpointError, read_checkpoint
from utils import files
from utils.files import write_json
from utils.training import main as entry
from utils.training.runlog import RunLog

try:
    from tests.entry_point import run_entry
except ImportError:  # tests/ on sys.path instead of the repo root
    from entry_point import run_entry

REPO = Path(__file__).resolve().parents[1]
MELD_DEFAULTS = dict(seed=67137, pareto_gamma=1.0)
FAST = ["--batch-size", "4", "--no-cuda"]


def run_main(capsys, argv):
    """The MELD entry point in-process; returns (exit status, stdout, stderr)."""
    return run_entry(capsys, "MELD", MELD_DEFAULTS, argv)


def run_script(code: str, argv: list[str]) -> subprocess.CompletedProcess:
    """`code` (which ends by calling the MELD entry point with sys.argv[1:]) in a Python process of its own."""
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def epoch_of(path: Path) -> int:
    return read_checkpoint(path)["epoch"]


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp"))


def records(log: Path) -> list[dict]:
    return [json.loads(line) for line in (log / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, meld_dir) -> Path:
    """A finished 2-epoch MELD run; its selected epoch is its last (epoch 1)."""
    log = tmp_path_factory.mktemp("finished") / "run"
    entry.main("MELD", MELD_DEFAULTS, ["--data-dir", str(meld_dir), "--log-dir", str(log), *FAST, "--epochs", "2"])
    assert json.loads((log / "summary.json").read_text())["selected_epoch"] == 1
    return log


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


# ------------------------------------------------------------------ best.pt after kills
def test_a_temp_file_left_linked_to_best_pt_is_not_written_through(capsys, tmp_path, finished_run):
    # The state a kill between the two renames of a save left before best.pt was renamed last: the temp
    # name is best.pt's file.
    log = copy_run(finished_run, tmp_path / "run")
    os.link(log / "best.pt", log / ".last.pt.tmp")
    status, _, err = run_main(capsys, ["--resume", "--log-dir", str(log), "--epochs", "3"])
    assert status == 0, err
    summary = json.loads((log / "summary.json").read_text())
    assert summary["selected_epoch"] == 1                        # epoch 2 did not do better
    assert (epoch_of(log / "best.pt"), epoch_of(log / "last.pt")) == (1, 2)
    assert read_checkpoint(log / "best.pt")["metrics"] == summary["metrics"]
    assert temp_files(log) == []


KILL_BETWEEN_THE_RENAMES = """
import os, signal, sys
from utils.training import main as entry, trainer
real_save, real_replace = trainer.save_atomic, os.replace

def save_atomic(obj, path, also=None):
    if obj["epoch"] == 1 and also is not None:          # the save of an epoch that is the best so far
        renamed = []
        def replace(source, target):
            if renamed:
                os.kill(os.getpid(), signal.SIGKILL)
            renamed.append(target)
            real_replace(source, target)
        os.replace = replace
    real_save(obj, path, also)

trainer.save_atomic = save_atomic
entry.main("MELD", dict(seed=67137, pareto_gamma=1.0), sys.argv[1:])
"""


def test_a_kill_between_the_renames_of_a_save_leaves_best_pt_repairable(capsys, tmp_path, meld_dir):
    log = tmp_path / "killed"
    done = run_script(KILL_BETWEEN_THE_RENAMES, ["--data-dir", str(meld_dir), "--log-dir", str(log), *FAST,
                                                 "--epochs", "2"])
    assert done.returncode == -signal.SIGKILL, done.stderr
    # last.pt is renamed first: it holds the new best epoch, and best.pt still the one before.
    assert (epoch_of(log / "last.pt"), epoch_of(log / "best.pt")) == (1, 0)
    assert temp_files(log) == [".best.pt.tmp"]
    status, out, err = run_main(capsys, ["--resume", "--log-dir", str(log)])     # its 2 epochs: no training
    assert status == 0, err
    assert "resumed from" in out and "epoch 2/2 |" not in out
    assert json.loads((log / "summary.json").read_text())["selected_epoch"] == 1
    assert os.path.samefile(log / "best.pt", log / "last.pt")
    assert temp_files(log) == []


# ------------------------------------------------------------------ damaged and foreign checkpoints
def flip_bytes(path: Path, count: int = 1) -> str:
    """Flip `count` bytes in the middle of the largest tensor record of a checkpoint; returns the record's name."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.compress_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        start = info.header_offset + 30 + name_length + extra_length + info.compress_size // 2
        f.seek(start)
        data = bytes(b ^ 0xFF for b in f.read(count))
        f.seek(start)
        f.write(data)
    return info.filename


def test_a_checkpoint_with_flipped_bytes_is_refused(tmp_path):
    path = tmp_path / "best.pt"
    torch.save({"model": {"w": torch.arange(1000.0)}, "epoch": 3}, path)
    name = flip_bytes(path)
    assert not torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.arange(1000.0))  # torch loads it
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert str(err.value) == (f"checkpoint {path}: damaged (the bytes of its record {name} do not match their "
                              f"CRC-32): it would load as wrong weights")


def test_resume_and_testing_refuse_a_damaged_checkpoint(capsys, tmp_path, finished_run, meld_dir):
    log = copy_run(finished_run, tmp_path / "run")
    (log / "best.pt").unlink()
    shutil.copyfile(log / "last.pt", log / "best.pt")          # not one file: each is damaged on its own
    before = {name: (log / name).read_bytes() for name in ("train.log", "metrics.jsonl")}
    name = flip_bytes(log / "last.pt", count=50)
    assert flip_bytes(log / "best.pt", count=50) == name
    damaged = f"damaged (the bytes of its record {name} do not match their CRC-32): it would load as wrong weights"
    status, _, err = run_main(capsys, ["--resume", "--log-dir", str(log), "--epochs", "3"])
    assert (status, err) == (2, f"error: checkpoint {log / 'last.pt'}: {damaged}\n")
    assert {name: (log / name).read_bytes() for name in before} == before
    status, _, err = run_main(capsys, ["--testing", "--checkpoint", str(log / "best.pt"), "--data-dir", str(meld_dir),
                                       "--log-dir", str(tmp_path / "test"), *FAST])
    assert (status, err) == (2, f"error: checkpoint {log / 'best.pt'}: {damaged}\n")
    assert not (tmp_path / "test").exists()


def test_resume_refuses_a_last_pt_of_another_run(capsys, tmp_path, finished_run, meld_dir):
    other = tmp_path / "other"
    assert run_main(capsys, ["--data-dir", str(meld_dir), "--log-dir", str(other), *FAST, "--epochs", "1",
                             "--num_L", "2", "--modals", "al"])[0] == 0
    log = copy_run(finished_run, tmp_path / "run")
    shutil.copyfile(other / "last.pt", log / "last.pt")
    before = {name: (log / name).read_bytes() for name in ("train.log", "metrics.jsonl")}
    status, _, err = run_main(capsys, ["--resume", "--log-dir", str(log), "--epochs", "3"])
    assert (status, err) == (2, f"error: --resume: {log / 'last.pt'} is not the last.pt of the run in {log}: its "
                                f"record of epoch 0 differs from {log / 'metrics.jsonl'} (a last.pt of another run?); "
                                f"put back the run's own, or continue that other run in its own folder\n")
    assert {name: (log / name).read_bytes() for name in before} == before


def test_a_checkpoint_without_weights_is_not_taken_for_a_model(capsys, tmp_path, meld_dir):
    torch.save({"model": {}}, tmp_path / "empty.pt")
    torch.save({"conv1.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    argv = ["--testing", "--data-dir", str(meld_dir), "--log-dir", str(tmp_path / "t"), *FAST]
    status, _, err = run_main(capsys, [*argv, "--checkpoint", str(tmp_path / "empty.pt")])
    assert (status, err) == (2, "error: checkpoint holds no weights (its state_dict is empty): it is not a trained "
                                "model\n")
    status, _, err = run_main(capsys, [*argv, "--checkpoint", str(tmp_path / "other.pt")])
    assert (status, err) == (2, "error: checkpoint does not fit the model: none of its keys (conv1.weight) is one of "
                                "M3Net's: it is not a checkpoint of this model\n")
    assert not (tmp_path / "t").exists()


# ------------------------------------------------------------------ NaN / Inf
def test_a_nan_evaluation_loss_stops_the_run_like_a_nan_training_loss(capsys, tmp_path, meld_dir, monkeypatch):
    real_loss = entry.multimodal_loss

    class NaNInSecondEvaluation(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.evaluations = inner, 0

        def forward(self, log_probs, labels):
            loss = self.inner(log_probs, labels)
            if not torch.is_grad_enabled():
                self.evaluations += 1
                if self.evaluations == 2:                  # the test split after epoch 1
                    return loss * float("nan")
            return loss

    monkeypatch.setattr(entry, "multimodal_loss", lambda *a: NaNInSecondEvaluation(real_loss(*a)))
    log = tmp_path / "nan"
    status, _, err = run_main(capsys, ["--data-dir", str(meld_dir), "--log-dir", str(log), *FAST, "--epochs", "3"])
    assert (status, err) == (1, f"error: the test loss became NaN/Inf at epoch 2/3 (epoch 1 in metrics.jsonl), "
                                f"evaluated after its training; {log / 'last.pt'} holds the last good epoch\n")
    assert [r["epoch"] for r in records(log)] == [0] and epoch_of(log / "last.pt") == 0
    assert (log / "train.log").read_text().splitlines()[-1] == err.strip()
    assert not (log / "summary.json").exists()


def test_json_outputs_hold_no_nan_or_inf(tmp_path):
    with RunLog(tmp_path / "run") as log:
        log.epoch({"epoch": 0, "test": {"loss": float("nan")}, "cos": [float("inf"), -0.25]})
    line = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert line == '{"epoch": 0, "test": {"loss": null}, "cos": [null, -0.25]}\n'
    write_json(tmp_path / "summary.json", {"loss": float("-inf"), "acc": 12.5})
    assert (tmp_path / "summary.json").read_text() == '{\n "loss": null,\n "acc": 12.5\n}\n'


def test_testing_refuses_a_checkpoint_whose_test_loss_is_nan(capsys, tmp_path, finished_run, meld_dir):
    state = read_checkpoint(finished_run / "best.pt")
    state["model"]["smax_fc.bias"][0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    status, _, err = run_main(capsys, ["--testing", "--checkpoint", str(tmp_path / "nan.pt"), "--data-dir",
                                       str(meld_dir), "--log-dir", str(tmp_path / "t"), *FAST])
    assert (status, err) == (2, f"error: checkpoint {tmp_path / 'nan.pt'}: its test loss on this data is NaN/Inf, so "
                                f"its predictions are not a model's; {tmp_path / 't' / 'test_metrics.json'} not "
                                f"written\n")
    assert not (tmp_path / "t" / "test_metrics.json").exists()
    assert (tmp_path / "t" / "train.log").read_text().splitlines()[-1] == err.strip()


# ------------------------------------------------------------------ full disks
@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of a given size on a new folder (root only); returns None where that fails."""
    mounted = []

    def mount(size: str) -> Path | None:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                  capture_output=True)
        except FileNotFoundError:                  # no mount command
            return None
        if done.returncode != 0:
            return None
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def _writes_to(fd: int, name: str) -> bool:
    return os.readlink(f"/proc/self/fd/{fd}").endswith(f"/{name}")


def test_a_full_disk_while_appending_metrics_is_one_line(capsys, tmp_path, meld_dir, small_disk, monkeypatch):
    # On a 4 KB tmpfs, train.log's first lines take its one page: the first metrics line finds no room.
    disk = small_disk("4k")
    if disk is None:                          # no mount: half the line is written, then the disk is full
        real_write_all = files._write_all

        def full(fd, data):
            if not _writes_to(fd, "metrics.jsonl"):
                return real_write_all(fd, data)
            os.write(fd, data[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(files, "_write_all", full)
        disk = tmp_path
    log = disk / "run"
    status, _, err = run_main(capsys, ["--data-dir", str(meld_dir), "--log-dir", str(log), *FAST, "--epochs", "2"])
    assert (status, err) == (2, f"error: cannot write the metrics of epoch 1/2: {log / 'metrics.jsonl'} "
                                f"(No space left on device)\n")
    assert (log / "metrics.jsonl").read_text() == ""             # nothing of the line is left
    assert (log / "train.log").read_text().splitlines()[-1] == err.strip()


def test_a_full_disk_while_writing_the_checkpoint_is_one_line(capsys, tmp_path, meld_dir, small_disk, monkeypatch):
    disk = small_disk("1m")
    if disk is None:                          # no mount: the temp file is one that takes no byte
        real_open = open
        monkeypatch.setattr(checkpoint, "open", lambda path, mode: real_open("/dev/full", "wb")
                            if Path(path).name == ".last.pt.tmp" else real_open(path, mode), raising=False)
        disk = tmp_path
    log = disk / "run"
    status, _, err = run_main(capsys, ["--data-dir", str(meld_dir), "--log-dir", str(log), *FAST, "--epochs", "1"])
    assert (status, err) == (2, f"error: cannot write the checkpoint of epoch 1/1: {log / 'last.pt'} "
                                f"(No space left on device)\n")
    assert sorted(p.name for p in log.iterdir()) == [".lock", "metrics.jsonl", "train.log"]
    assert (log / "train.log").read_text().splitlines()[-1] == err.strip()


def test_a_summary_that_could_not_be_written_is_written_by_resume(capsys, tmp_path, meld_dir, monkeypatch):
    real_write_new = files.write_new

    def full(path, data):
        if path.name == ".summary.json.tmp":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write_new(path, data)

    log = tmp_path / "run"
    argv = ["--data-dir", str(meld_dir), "--log-dir", str(log), *FAST, "--epochs", "2"]
    with monkeypatch.context() as patch:
        patch.setattr(files, "write_new", full)
        status, _, err = run_main(capsys, argv)
    assert (status, err) == (2, f"error: cannot write {log / 'summary.json'} (No space left on device); the run's "
                                f"epochs are kept: once it can be written, --resume --log-dir {log} writes it without "
                                f"training further\n")
    assert (log / "train.log").read_text().splitlines()[-1] == err.strip()
    assert not (log / "summary.json").exists() and temp_files(log) == []
    status, out, err = run_main(capsys, ["--resume", "--log-dir", str(log)])
    assert status == 0, err
    assert "epoch 2/2 |" not in out and "selected epoch 2/2" in out
    summary = json.loads((log / "summary.json").read_text())
    assert summary["metrics"] == records(log)[summary["selected_epoch"]]
    status, _, err = run_main(capsys, ["--resume", "--log-dir", str(log)])       # now there is nothing left to do
    assert status == 2 and "asks for no more: give --epochs above 2 to continue it\n" in err


# ------------------------------------------------------------------ Ctrl-C and SIGTERM
SIGNAL_DURING_THE_CHECKPOINT = """
import os, signal, sys
from model import checkpoint
from utils.training import main as entry
real_write, writes = checkpoint._RecordingWriter.write, []

def write(self, data):
    writes.append(len(data))
    if len(writes) == 3:                                   # early in the first last.pt
        os.kill(os.getpid(), signal.{name})
    return real_write(self, data)

checkpoint._RecordingWriter.write = write
entry.main("MELD", dict(seed=67137, pareto_gamma=1.0), sys.argv[1:])
"""


@pytest.mark.parametrize("name, status, stopped", [("SIGINT", 130, "interrupted"),
                                                   ("SIGTERM", 143, "terminated by SIGTERM")])
def test_a_stop_signal_during_the_checkpoint_write_waits_for_it(tmp_path, meld_dir, name, status, stopped):
    log = tmp_path / "run"
    done = run_script(SIGNAL_DURING_THE_CHECKPOINT.replace("{name}", name),
                      ["--data-dir", str(meld_dir), "--log-dir", str(log), *FAST, "--epochs", "2"])
    line = f"{stopped} ({log / 'last.pt'} keeps the last finished epoch: continue it with --resume --log-dir {log})"
    assert (done.returncode, done.stderr) == (status, line + "\n")
    assert (log / "train.log").read_text().splitlines()[-1] == line
    assert epoch_of(log / "last.pt") == epoch_of(log / "best.pt") == 0          # written whole
    assert [r["epoch"] for r in records(log)] == [0] and temp_files(log) == []


SIGNAL_SWALLOWED_IN_A_STEP = """
import os, signal, sys
from utils.dgs import step
from utils.training import main as entry
real_call = step.DGSStep.__call__

def call(self, batch, modulation_on):
    try:                                  # as a library's bare except: swallows what it is given
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):
            pass
    except BaseException:
        pass
    return real_call(self, batch, modulation_on)

step.DGSStep.__call__ = call
entry.main("MELD", dict(seed=67137, pareto_gamma=1.0), sys.argv[1:])
"""

SIGNAL_RIGHT_AFTER_THE_FLAGS_LINE = """
import os, signal, sys
from utils.training import main as entry
real_build_step = entry.build_step

def build_step(*args):
    os.kill(os.getpid(), signal.SIGINT)   # while the optimizer is being built
    return real_build_step(*args)

entry.build_step = build_step
entry.main("MELD", dict(seed=67137, pareto_gamma=1.0), sys.argv[1:])
"""


@pytest.mark.parametrize("code, status, stopped", [(SIGNAL_SWALLOWED_IN_A_STEP, 143, "terminated by SIGTERM"),
                                                   (SIGNAL_RIGHT_AFTER_THE_FLAGS_LINE, 130, "interrupted")])
def test_a_stop_signal_before_the_first_checkpoint_ends_the_run_with_its_line(tmp_path, meld_dir, code, status,
                                                                              stopped):
    log = tmp_path / "run"
    done = run_script(code, ["--data-dir", str(meld_dir), "--log-dir", str(log), *FAST, "--epochs", "2"])
    line = f"{stopped} in the first epoch: nothing saved to continue from; remove {log} before reusing it"
    assert (done.returncode, done.stderr) == (status, line + "\n")
    assert (log / "train.log").read_text().splitlines()[-1] == line
    assert records(log) == [] and not (log / "last.pt").exists()


def test_sigterm_stops_a_run_like_ctrl_c(tmp_path, meld_dir):
    log = tmp_path / "run"
    cmd = [sys.executable, "-u", str(REPO / "run" / "train_OGM_Shapley_MMPareto_MELD.py"), "--data-dir",
           str(meld_dir), "--log-dir", str(log), *FAST, "--epochs", "20"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as run:
        for text in run.stdout:
            if text.startswith("epoch 1/20 |"):
                run.send_signal(signal.SIGTERM)
                break
        stderr = run.stderr.read()
    line = (f"terminated by SIGTERM ({log / 'last.pt'} keeps the last finished epoch: continue it with --resume "
            f"--log-dir {log})")
    assert (run.returncode, stderr) == (143, line + "\n")
    assert (log / "train.log").read_text().splitlines()[-1] == line
    assert epoch_of(log / "last.pt") == len(records(log)) - 1
