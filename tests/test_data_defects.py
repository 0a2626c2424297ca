"""User-facing defects of data loading, the generator and checkpoints: each ends in one line, exit status 2."""
from __future__ import annotations

import builtins
import errno
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dataloader import __main__ as summary_cli
from dataloader import synthetic
from dataloader.datasets import (DATASETS, MAX_FEATURE_MAGNITUDE, DataError, data_files, find_data_dir,
                                 load_conversations)
from dataloader.synthetic import check_size, estimated_bytes, generate
from model.checkpoint import CheckpointError, load_model_state, read_checkpoint
from model.m3net import M3Net, ModelConfig
from utils.errors import UserError

try:
    from tests.entry_point import run_entry
except ImportError:  # tests/ on sys.path instead of the repo root
    from entry_point import run_entry

REPO = Path(__file__).resolve().parents[1]
IEMOCAP = DATASETS["IEMOCAP"]
TRAIN_DEFAULTS = dict(seed=1475, use_modal=True, pareto_gamma=0.2, epochs=2)


def run_main(capsys, argv: list[str]) -> tuple[int, str]:
    """The IEMOCAP training entry point in-process; returns (exit status, stderr)."""
    status, _, err = run_entry(capsys, "IEMOCAP", TRAIN_DEFAULTS, argv)
    return status, err


def _inside(path: object, folder: Path) -> bool:
    """Whether `path` (a str, bytes or PathLike; not a file descriptor) lies strictly inside `folder`."""
    if isinstance(path, int):
        return False
    path = Path(os.fsdecode(path)).absolute()
    return path != folder.absolute() and path.is_relative_to(folder.absolute())


def deny_folder(monkeypatch, folder: Path) -> None:
    """Do what the kernel does for a folder without read and search permission (chmod 000), which
    root ignores: looking at anything inside it raises PermissionError."""
    real_stat, real_open = os.stat, builtins.open

    def stat(path, *args, **kwargs):
        if _inside(path, folder):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real_stat(path, *args, **kwargs)

    def open_(file, *args, **kwargs):
        if _inside(file, folder):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(builtins, "open", open_)


def deny_file(monkeypatch, path: Path) -> None:
    """A file without read permission: it can be looked at, not opened."""
    real_open = builtins.open

    def open_(file, *args, **kwargs):
        if not isinstance(file, int) and Path(os.fsdecode(file)).absolute() == path.absolute():
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)


@pytest.fixture(scope="module")
def tiny_iemocap(tmp_path_factory) -> Path:
    """2 train / 1 test dialogues, copied and re-pickled by the corruption tests."""
    root = tmp_path_factory.mktemp("tiny_iemocap")
    generate("IEMOCAP", root, scale=0.01, seed=1)
    return root


def _copy(src_root: Path, dst_root: Path) -> tuple[Path, Path]:
    shutil.copytree(src_root / IEMOCAP.folder, dst_root / IEMOCAP.folder)
    folder = dst_root / IEMOCAP.folder
    return folder / IEMOCAP.feature_file, folder / IEMOCAP.roberta_file


def _read(path: Path) -> list:
    with open(path, "rb") as f:
        return list(pickle.load(f, encoding="latin1"))


def _write(path: Path, entries: list) -> None:
    with open(path, "wb") as f:
        pickle.dump(tuple(entries), f, protocol=4)


# ================================================================== 1. unreadable data folders
def test_an_unreadable_features_folder_is_one_data_error(monkeypatch, iemocap_dir):
    folder = iemocap_dir / IEMOCAP.folder
    deny_folder(monkeypatch, folder)
    for data_dir in (iemocap_dir, folder):           # the folder above it, or the folder itself
        with pytest.raises(DataError) as err:
            load_conversations("IEMOCAP", data_dir)
        assert str(err.value) == f"cannot read {folder}: Permission denied"
        with pytest.raises(DataError) as err:
            data_files("IEMOCAP", data_dir)
        assert str(err.value) == f"cannot read {folder}: Permission denied"


def test_an_unreadable_data_dir_is_named(monkeypatch, iemocap_dir):
    deny_folder(monkeypatch, iemocap_dir)
    with pytest.raises(DataError) as err:
        load_conversations("IEMOCAP", iemocap_dir)
    assert str(err.value) == f"cannot read {iemocap_dir}: Permission denied"


def test_an_unreadable_current_folder_is_named_when_looking_for_data(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    deny_folder(monkeypatch, tmp_path)
    with pytest.raises(DataError) as err:
        find_data_dir("IEMOCAP")
    assert str(err.value) == f"cannot read {Path.cwd()}: Permission denied"


def test_an_unreadable_pickle_is_named(monkeypatch, iemocap_dir):
    feature_path = iemocap_dir / IEMOCAP.folder / IEMOCAP.feature_file
    deny_file(monkeypatch, feature_path)
    with pytest.raises(DataError) as err:
        load_conversations("IEMOCAP", iemocap_dir)
    assert str(err.value) == f"cannot read {feature_path}: Permission denied"


def test_training_on_an_unreadable_data_dir_is_one_line(capsys, monkeypatch, tmp_path, iemocap_dir):
    folder = (iemocap_dir / IEMOCAP.folder).resolve()
    deny_folder(monkeypatch, folder)
    status, err = run_main(capsys, ["--data-dir", str(iemocap_dir), "--log-dir", str(tmp_path / "run"), "--no-cuda"])
    assert (status, err) == (2, f"error: cannot read {folder}: Permission denied\n")
    assert not (tmp_path / "run").exists()


def test_the_summary_cli_on_an_unreadable_data_dir_is_one_line(capsys, monkeypatch, iemocap_dir):
    folder = iemocap_dir / IEMOCAP.folder
    deny_folder(monkeypatch, folder)
    assert summary_cli.main(["--Dataset", "IEMOCAP", "--data-dir", str(iemocap_dir)]) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", f"error: cannot read {folder}: Permission denied\n")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads folders whatever their permissions")
@pytest.mark.parametrize("denied", ["data dir", "features folder"])
def test_a_real_chmod_000_folder_is_one_line(tmp_path, iemocap_dir, denied):
    shutil.copytree(iemocap_dir / IEMOCAP.folder, tmp_path / IEMOCAP.folder)
    folder = tmp_path if denied == "data dir" else tmp_path / IEMOCAP.folder
    folder.chmod(0)
    try:
        with pytest.raises(DataError) as err:
            load_conversations("IEMOCAP", tmp_path)
        assert str(err.value) == f"cannot read {folder}: Permission denied"
        result = subprocess.run([sys.executable, "-m", "dataloader", "--Dataset", "IEMOCAP", "--data-dir",
                                 str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert (result.returncode, result.stdout, result.stderr) == (
            2, "", f"error: cannot read {folder}: Permission denied\n")
    finally:
        folder.chmod(0o755)


# ================================================================== 2. the probe only reads
def test_the_probe_of_an_unreadable_data_dir_names_data_dir(capsys, monkeypatch, iemocap_dir):
    folder = iemocap_dir / IEMOCAP.folder
    deny_folder(monkeypatch, folder)
    assert synthetic.main(["--probe", "--Dataset", "IEMOCAP", "--data-dir", str(iemocap_dir)]) == 2
    assert capsys.readouterr().err == (f"error: --data-dir {iemocap_dir}: cannot read {folder}: "
                                       f"Permission denied\n")


def test_any_os_error_of_the_probe_names_data_dir_not_out(capsys, monkeypatch, iemocap_dir):
    def failing(dataset, data_dir):
        raise OSError(errno.EIO, "Input/output error", str(Path(data_dir) / IEMOCAP.folder / IEMOCAP.feature_file))

    monkeypatch.setattr(synthetic, "load_conversations", failing)
    assert synthetic.main(["--probe", "--Dataset", "IEMOCAP", "--data-dir", str(iemocap_dir)]) == 2
    assert capsys.readouterr().err == (f"error: --data-dir {iemocap_dir}: cannot read "
                                       f"{iemocap_dir / IEMOCAP.folder / IEMOCAP.feature_file}: Input/output error\n")


# ================================================================== 3. huge finite features
def test_the_bound_keeps_float32_sums_of_squares_finite_and_real_features_pass():
    widest = max(1024, DATASETS["IEMOCAP"].audio_dim, DATASETS["MELD"].audio_dim, 342)
    squares = np.full(widest, MAX_FEATURE_MAGNITUDE, dtype=np.float32) ** 2
    assert np.isfinite(squares.sum(dtype=np.float32)) and squares.sum(dtype=np.float32) < 1e20
    assert MAX_FEATURE_MAGNITUDE >= 1e5          # openSMILE descriptors reach the thousands


@pytest.mark.parametrize("field, utterance, dimension, value", [
    ("videoAudio", 2, 5, 1e38),                  # finite in float32, overflows training
    ("videoVisual", 0, 341, -2e6),
    ("videoAudio", 1, 0, 1e39),                  # beyond float32: not reported as NaN/Inf
])
def test_huge_finite_features_are_refused(tmp_path, tiny_iemocap, field, utterance, dimension, value):
    feature_path, _ = _copy(tiny_iemocap, tmp_path)
    entries = _read(feature_path)
    index = IEMOCAP.feature_fields.index(field)
    vid = entries[-2][0]                          # the first train dialogue
    rows = [np.asarray(row, dtype=np.float64) for row in entries[index][vid]]
    rows[utterance][dimension] = value
    entries[index][vid] = rows
    _write(feature_path, entries)
    with pytest.raises(DataError) as err:
        load_conversations("IEMOCAP", tmp_path)
    assert str(err.value) == (f"{feature_path}: dialogue {vid!r}: {field}: value {value:g} at utterance {utterance}, "
                              f"dimension {dimension}, is beyond 1e+06, the bound on feature magnitudes "
                              f"(a corrupted file?)")


def test_a_flipped_exponent_bit_in_a_roberta_layer_is_refused(tmp_path, tiny_iemocap):
    _, roberta_path = _copy(tiny_iemocap, tmp_path)
    entries = _read(roberta_path)
    vid = entries[-3][0]                         # trainIds
    layer = entries[3][vid].copy()               # roberta2
    column = int(np.flatnonzero(np.abs(layer[1]) < 1)[0])   # below 1 the flip stays finite
    layer.view(np.uint32)[1, column] ^= np.uint32(1 << 30)   # the top exponent bit
    flipped = float(layer[1, column])
    assert np.isfinite(flipped) and abs(flipped) > 1e37
    entries[3][vid] = layer
    _write(roberta_path, entries)
    with pytest.raises(DataError) as err:
        load_conversations("IEMOCAP", tmp_path)
    assert str(err.value) == (f"{roberta_path}: dialogue {vid!r}: roberta2: value {flipped:g} at utterance 1, "
                              f"dimension {column}, is beyond 1e+06, the bound on feature magnitudes (a corrupted "
                              f"file?)")


def test_features_up_to_the_bound_load(tmp_path, tiny_iemocap):
    feature_path, _ = _copy(tiny_iemocap, tmp_path)
    entries = _read(feature_path)
    vid = entries[-2][0]
    rows = [np.asarray(row, dtype=np.float32) for row in entries[4][vid]]
    rows[0][0], rows[0][1] = MAX_FEATURE_MAGNITUDE, -4321.5      # an openSMILE-like value in the thousands
    entries[4][vid] = rows
    _write(feature_path, entries)
    audio = next(d for d in load_conversations("IEMOCAP", tmp_path).splits["train"] if d.id == vid).audio
    assert (audio[0, 0], audio[0, 1]) == (np.float32(MAX_FEATURE_MAGNITUDE), np.float32(-4321.5))


def test_nan_is_still_reported_as_nan(tmp_path, tiny_iemocap):
    feature_path, _ = _copy(tiny_iemocap, tmp_path)
    entries = _read(feature_path)
    vid = entries[-2][0]
    rows = [np.asarray(row, dtype=np.float64) for row in entries[5][vid]]
    rows[3][0] = np.nan
    entries[5][vid] = rows
    _write(feature_path, entries)
    with pytest.raises(DataError) as err:
        load_conversations("IEMOCAP", tmp_path)
    assert str(err.value) == f"{feature_path}: dialogue {vid!r}: videoVisual has NaN/Inf values (utterance 3)"


# ================================================================== 4. absurd --scale
def test_an_absurd_scale_is_refused_before_anything_is_generated(capsys, tmp_path):
    out = tmp_path / "out"
    assert synthetic.main(["--Dataset", "IEMOCAP", "--out", str(out), "--scale", "1e9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --scale 1e+09: the IEMOCAP pickles would take about 184 PB")
    assert err.count("\n") == 1 and "the largest --scale that fits is about " in err
    assert not out.exists()


def test_the_scale_refusal_names_the_size_and_the_largest_scale_that_fits(capsys, monkeypatch, tmp_path):
    out = tmp_path / "out"
    monkeypatch.setattr(synthetic, "_available_memory", lambda: 10**9)
    monkeypatch.setattr(synthetic.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**13, 0, 10**13))
    assert estimated_bytes("IEMOCAP", 1.0) == 7433 * (4 * (4 * 1024 + 1582 + 342 + 100) + 300)
    assert synthetic.main(["--Dataset", "IEMOCAP", "--out", str(out), "--scale", "1e9"]) == 2
    assert capsys.readouterr().err == ("error: --scale 1e+09: the IEMOCAP pickles would take about 184 PB and about "
                                       "368 PB of memory to generate, more than the 1 GB of memory available; the "
                                       "largest --scale that fits is about 2.7\n")
    check_size("IEMOCAP", out, 2.7)                  # the scale it names does fit
    assert not out.exists()


def test_the_scale_refusal_names_the_disk_when_it_is_the_tighter_limit(monkeypatch, tmp_path):
    monkeypatch.setattr(synthetic, "_available_memory", lambda: 10**15)
    monkeypatch.setattr(synthetic.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 0, 10**8))
    with pytest.raises(UserError) as err:
        generate("IEMOCAP", tmp_path / "a" / "b", scale=1.0)
    assert str(err.value) == (f"--scale 1: the IEMOCAP pickles would take about 184 MB, more than the 100 MB free on "
                              f"{tmp_path}; the largest --scale that fits is about 0.53")
    assert list(tmp_path.iterdir()) == []
    check_size("IEMOCAP", tmp_path, 0.53)            # rounded dialogue counts make 0.54 just too big
    with pytest.raises(UserError) as err:
        check_size("IEMOCAP", tmp_path, 0.54)
    assert str(err.value).endswith("; the largest --scale that fits is about 0.53")


# ================================================================== 5. checkpoints without model weights
def _model() -> M3Net:
    torch.manual_seed(0)
    return M3Net(ModelConfig(n_classes=6, n_speakers=2, audio_dim=1582, visual_dim=342, modals="av", dropout=0.0))


def test_a_partial_state_dict_gets_no_num_L_0_hint():
    model = _model()
    own = model.state_dict()
    state = {k: own[k].clone() for k in ("smax_fc.weight", "smax_fc.bias")}
    with pytest.raises(CheckpointError) as err:
        load_model_state(model, state)
    msg = str(err.value)
    assert msg.startswith("checkpoint does not fit the model: missing normBNa.weight, ")
    assert msg.endswith("(it has no graph_model weights: a part of an M3Net state_dict, not a whole one)")
    assert "--num_L" not in msg and "--num_K" not in msg and "\n" not in msg


def test_a_state_dict_of_never_read_keys_holds_no_weights():
    with pytest.raises(CheckpointError) as err:
        load_model_state(_model(), {"hidfc.weight": torch.zeros(2, 3), "hidfc.bias": torch.zeros(2)})
    assert str(err.value) == ("checkpoint holds no weights M3Net reads: only keys its forward never reads "
                              "(hidfc.weight, hidfc.bias): it is not a trained model")


def test_a_model_entry_of_non_tensors_is_not_a_state_dict(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"model": {"smax_fc.weight": "weights"}}, path)
    with pytest.raises(CheckpointError) as err:
        load_model_state(_model(), read_checkpoint(path)["model"])
    assert str(err.value) == "checkpoint is not a state_dict: its entry 'smax_fc.weight' is not a tensor (str)"


@pytest.mark.parametrize("state, message", [
    ({}, "checkpoint holds no weights (its state_dict is empty): it is not a trained model"),
    ({"smax_fc.bias": torch.zeros(6)}, None),
])
def test_testing_a_checkpoint_without_model_weights_is_one_line(capsys, tmp_path, iemocap_dir, state, message):
    path = tmp_path / "weights.pt"
    torch.save({"model": state}, path)
    status, err = run_main(capsys, ["--testing", "--checkpoint", str(path), "--data-dir", str(iemocap_dir),
                                    "--log-dir", str(tmp_path / "test"), "--no-cuda", "--modals", "av"])
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "--num_L 0" not in err and "--num_K 0" not in err
    if message is not None:
        assert err == f"error: {message}\n"
    else:
        assert err.endswith("(it has no graph_model weights: a part of an M3Net state_dict, not a whole one)\n")
    assert not (tmp_path / "test").exists()


def test_available_memory_is_the_tighter_of_the_machine_and_its_cgroup(tmp_path):
    meminfo, cgroup = tmp_path / "meminfo", tmp_path / "cgroup"
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:    8000000 kB\n")
    cgroup.mkdir()
    (cgroup / "memory.max").write_text("max\n")
    assert synthetic._available_memory(meminfo, cgroup) == 8000000 * 1024
    (cgroup / "memory.max").write_text("4000000000\n")
    (cgroup / "memory.current").write_text("3000000000\n")
    (cgroup / "memory.stat").write_text("anon 1000000000\nfile 2000000000\nkernel 0\n")
    assert synthetic._available_memory(meminfo, cgroup) == 3_000_000_000     # its page cache counts as free
