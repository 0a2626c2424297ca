"""Loading, validation, batching and the `python -m dataloader` CLI, on tiny synthetic data."""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dataloader import (DataError, collate, load_conversations, make_loaders,
                        split_train_valid)
from dataloader import datasets
from dataloader.datasets import DATASETS, find_data_dir
from dataloader.synthetic import generate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_iemocap(tmp_path_factory) -> Path:
    """2 train / 1 test dialogues: the corruption tests re-pickle it many times."""
    root = tmp_path_factory.mktemp("tiny_iemocap")
    generate("IEMOCAP", root, scale=0.01, seed=1)
    return root


def _paths(root: Path, dataset: str) -> tuple[Path, Path]:
    info = DATASETS[dataset]
    return root / info.folder / info.feature_file, root / info.folder / info.roberta_file


def _read(path: Path) -> list:
    with open(path, "rb") as f:
        return list(pickle.load(f, encoding="latin1"))


def _copy(src_root: Path, dst_root: Path, dataset: str) -> tuple[Path, Path]:
    folder = DATASETS[dataset].folder
    shutil.copytree(src_root / folder, dst_root / folder)
    return _paths(dst_root, dataset)


def _write(path: Path, entries: list, protocol: int = 4) -> None:
    with open(path, "wb") as f:
        pickle.dump(tuple(entries), f, protocol=protocol)


# ------------------------------------------------------------------ loading

def test_iemocap_loads_in_file_order(iemocap_dir):
    feature_path, _ = _paths(iemocap_dir, "IEMOCAP")
    ids, speakers, labels, _, audio, _, _, train_vid, test_vid = _read(feature_path)
    conv = load_conversations("IEMOCAP", iemocap_dir)

    assert [d.id for d in conv.splits["train"]] == list(train_vid)
    assert [d.id for d in conv.splits["test"]] == list(test_vid)
    assert list(test_vid) != sorted(test_vid)  # the generator shuffles, so order is tested
    assert (conv.n_classes, conv.n_speakers) == (6, 2)
    assert conv.class_names == ("hap", "sad", "neu", "ang", "exc", "fru")
    assert conv.dims == {"text": 1024, "audio": 1582, "visual": 342}
    for d in conv.splits["train"] + conv.splits["test"]:
        n = len(labels[d.id])
        assert d.text.shape == (n, 4, 1024) and d.text.dtype == np.float32
        assert d.audio.shape == (n, 1582) and d.audio.dtype == np.float32
        assert d.visual.shape == (n, 342)
        assert d.labels.tolist() == labels[d.id]
        assert d.speakers.tolist() == [0 if s == "M" else 1 for s in speakers[d.id]]
        np.testing.assert_array_equal(d.audio, np.asarray(audio[d.id], dtype=np.float32))
    total = sum(conv.class_counts(s).sum() for s in ("train", "test"))
    assert total == sum(len(v) for v in labels.values())


def test_meld_loads_speakers_as_argmax(meld_dir):
    feature_path, roberta_path = _paths(meld_dir, "MELD")
    features, roberta = _read(feature_path), _read(roberta_path)
    conv = load_conversations("MELD", meld_dir)
    assert (conv.n_classes, conv.n_speakers, conv.dims["audio"]) == (7, 9, 300)
    assert [d.id for d in conv.splits["test"]] == list(features[8])
    for d in conv.splits["train"]:
        assert d.speakers.tolist() == np.argmax(features[1][d.id], axis=1).tolist()
        assert d.labels.tolist() == features[2][d.id]
        np.testing.assert_array_equal(d.text[:, 2], roberta[5][d.id])  # roberta3


def test_protocol2_and_list_valued_roberta_load(tiny_iemocap, tmp_path):
    """Real files are py2 pickles; their arrays may be lists of per-utterance vectors."""
    feature_path, roberta_path = _copy(tiny_iemocap, tmp_path, "IEMOCAP")
    roberta = _read(roberta_path)
    roberta[2] = {vid: list(value) for vid, value in roberta[2].items()}
    _write(roberta_path, roberta, protocol=2)
    _write(feature_path, _read(feature_path), protocol=2)
    expected = load_conversations("IEMOCAP", tiny_iemocap)
    got = load_conversations("IEMOCAP", tmp_path)
    assert len(got.splits["test"]) == len(expected.splits["test"]) > 0
    for a, b in zip(expected.splits["test"], got.splits["test"]):
        np.testing.assert_array_equal(a.text, b.text)


def test_set_valued_split_is_sorted(iemocap_dir, tmp_path):
    feature_path, _ = _copy(iemocap_dir, tmp_path, "IEMOCAP")
    features = _read(feature_path)
    features[7] = set(features[7])
    _write(feature_path, features)
    conv = load_conversations("IEMOCAP", tmp_path)
    assert [d.id for d in conv.splits["train"]] == sorted(features[7])


def test_data_dir_may_be_the_features_folder(iemocap_dir):
    conv = load_conversations("IEMOCAP", iemocap_dir / "IEMOCAP_features")
    assert len(conv.splits["train"]) == 12


# ------------------------------------------------------------------ batching

def test_collate_pads_with_zeros(iemocap_dir):
    conv = load_conversations("IEMOCAP", iemocap_dir)
    records = conv.splits["train"][:3]
    lengths = [len(r) for r in records]
    assert len(set(lengths)) > 1
    batch = collate(records)
    T, B = max(lengths), 3
    assert batch.text.shape == (4, T, B, 1024)
    assert batch.audio.shape == (T, B, 1582) and batch.visual.shape == (T, B, 342)
    assert batch.qmask.shape == (T, B, 2) and batch.qmask.dtype == torch.float32
    assert batch.umask.shape == (B, T) and batch.umask.dtype == torch.float32
    assert batch.labels.shape == (B, T) and batch.labels.dtype == torch.long
    assert batch.lengths.tolist() == lengths
    assert batch.ids == [r.id for r in records]
    for b, r in enumerate(records):
        n = len(r)
        assert batch.umask[b].tolist() == [1.0] * n + [0.0] * (T - n)
        assert batch.labels[b, :n].tolist() == r.labels.tolist()
        assert not batch.labels[b, n:].any()
        assert torch.equal(batch.text[:, :n, b], torch.from_numpy(r.text).transpose(0, 1))
        assert torch.equal(batch.audio[:n, b], torch.from_numpy(r.audio))
        assert torch.equal(batch.visual[:n, b], torch.from_numpy(r.visual))
        assert batch.qmask[:n, b].argmax(-1).tolist() == r.speakers.tolist()
        assert batch.qmask[:n, b].sum(-1).eq(1).all()
        for tensor in (batch.text[:, n:, b], batch.audio[n:, b], batch.visual[n:, b],
                       batch.qmask[n:, b]):
            assert not tensor.any()
    assert batch.labels[batch.umask.bool()].tolist() == np.concatenate([r.labels for r in records]).tolist()


def test_meld_qmask_has_nine_slots_and_single_utterance_dialogue_collates(meld_dir):
    conv = load_conversations("MELD", meld_dir)
    dialogue = conv.splits["train"][0]
    single = type(dialogue)(id="one", text=dialogue.text[:1], audio=dialogue.audio[:1],
                            visual=dialogue.visual[:1], speakers=dialogue.speakers[:1],
                            labels=dialogue.labels[:1], n_speakers=9)
    batch = collate([single, dialogue])
    assert batch.qmask.shape == (len(dialogue), 2, 9)
    assert batch.umask[0].sum() == 1


def test_loaders_order_and_shuffle(iemocap_dir):
    conv = load_conversations("IEMOCAP", iemocap_dir)
    loaders = make_loaders(conv, batch_size=2, seed=7)
    assert list(loaders) == ["train", "test"]
    test_ids = [vid for batch in loaders["test"] for vid in batch.ids]
    assert test_ids == [d.id for d in conv.splits["test"]]

    def train_order(seed: int) -> list:
        return [vid for batch in make_loaders(conv, 2, seed=seed)["train"] for vid in batch.ids]

    assert sorted(train_order(7)) == sorted(d.id for d in conv.splits["train"])
    assert train_order(7) == train_order(7)
    assert any(train_order(7) != train_order(s) for s in (8, 9, 10))
    unshuffled = make_loaders(conv, 2, shuffle_train=False)["train"]
    assert [v for b in unshuffled for v in b.ids] == [d.id for d in conv.splits["train"]]
    # Worker processes yield the same batches (collate and records are picklable).
    in_workers = make_loaders(conv, 2, seed=7, num_workers=1)
    assert [v for b in in_workers["train"] for v in b.ids] == train_order(7)
    assert [v for b in in_workers["test"] for v in b.ids] == test_ids


def test_split_train_valid(iemocap_dir):
    conv = load_conversations("IEMOCAP", iemocap_dir)
    train_ids = [d.id for d in conv.splits["train"]]
    held = split_train_valid(conv, 0.25, seed=3)
    assert list(held.splits) == ["train", "valid", "test"]
    assert len(held.splits["valid"]) == 3
    kept, valid = ([d.id for d in held.splits[s]] for s in ("train", "valid"))
    assert sorted(kept + valid) == sorted(train_ids)
    assert kept == [v for v in train_ids if v in kept]  # file order kept in both parts
    assert valid == [v for v in train_ids if v in valid]
    assert valid == [d.id for d in split_train_valid(conv, 0.25, seed=3).splits["valid"]]
    assert split_train_valid(conv, 0.0, seed=3) is conv
    assert conv.splits["train"][0].id == train_ids[0]  # the input is not modified
    with pytest.raises(ValueError):
        split_train_valid(conv, 1.0, seed=3)

    loaders = make_loaders(conv, batch_size=2, valid_frac=0.25, seed=3)
    assert list(loaders) == ["train", "valid", "test"]
    assert [v for b in loaders["valid"] for v in b.ids] == valid


# ------------------------------------------------------------------ validation

def _missing_roberta(feature, roberta):
    del roberta[5][feature[8][0]]  # roberta4 lacks a test dialogue
    return "roberta", feature[8][0], "missing from roberta4"


def _missing_audio(feature, roberta):
    del feature[4][feature[7][1]]
    return "feature", feature[7][1], "missing from videoAudio"


def _short_visual(feature, roberta):
    vid = feature[7][0]
    feature[5][vid] = feature[5][vid][:-1]
    return "feature", vid, "videoVisual has"


def _short_roberta(feature, roberta):
    vid = feature[8][0]
    roberta[3][vid] = roberta[3][vid][1:]
    return "roberta", vid, "roberta2 has"


def _short_speakers(feature, roberta):
    vid = feature[7][1]
    feature[1][vid] = feature[1][vid][:-1]
    return "feature", vid, "videoSpeakers has"


def _wide_audio(feature, roberta):
    vid = feature[7][0]
    feature[4][vid] = [np.append(v, 0.0).astype(np.float32) for v in feature[4][vid]]
    return "feature", vid, "dimension 1583, expected 1582"


def _narrow_text(feature, roberta):
    vid = feature[8][0]
    roberta[2][vid] = roberta[2][vid][:, :768]
    return "roberta", vid, "dimension 768, expected 1024"


def _ragged_visual(feature, roberta):
    vid = feature[7][0]
    feature[5][vid][1] = feature[5][vid][1][:10]
    return "feature", vid, "videoVisual"


def _nan_audio(feature, roberta):
    vid = feature[7][-1]
    feature[4][vid][2] = np.full_like(feature[4][vid][2], np.nan)
    return "feature", vid, "NaN/Inf values (utterance 2)"


def _inf_text(feature, roberta):
    vid = feature[8][0]
    roberta[2][vid] = roberta[2][vid].copy()
    roberta[2][vid][0, 5] = np.inf
    return "roberta", vid, "NaN/Inf"


def _label_too_big(feature, roberta):
    vid = feature[7][0]
    feature[2][vid] = [6] + feature[2][vid][1:]
    return "feature", vid, "label 6 at utterance 0 is outside 0..5"


def _negative_label(feature, roberta):
    vid = feature[8][0]
    feature[2][vid] = feature[2][vid][:-1] + [-1]
    return "feature", vid, "label -1"


def _bad_speaker(feature, roberta):
    vid = feature[7][0]
    feature[1][vid] = ["X"] + feature[1][vid][1:]
    return "feature", vid, "speaker 'X'"


def _empty_test(feature, roberta):
    feature[8] = []
    return "feature", None, "testVid is empty"


def _overlap(feature, roberta):
    feature[8] = list(feature[8]) + [feature[7][0]]
    return "feature", feature[7][0], "in both trainVid and testVid"


def _wrong_arity(feature, roberta):
    del feature[-1]
    return "feature", None, "expected a 9-tuple"


@pytest.mark.parametrize("corrupt", [
    _missing_roberta, _missing_audio, _short_visual, _short_roberta, _short_speakers,
    _wide_audio, _narrow_text, _ragged_visual, _nan_audio, _inf_text, _label_too_big,
    _negative_label, _bad_speaker, _empty_test, _overlap, _wrong_arity,
], ids=lambda f: f.__name__.strip("_"))
def test_bad_iemocap_data_names_file_and_dialogue(tiny_iemocap, tmp_path, corrupt):
    feature_path, roberta_path = _copy(tiny_iemocap, tmp_path, "IEMOCAP")
    feature, roberta = _read(feature_path), _read(roberta_path)
    which, vid, phrase = corrupt(feature, roberta)
    _write(feature_path, feature)
    _write(roberta_path, roberta)
    with pytest.raises(DataError) as info:
        load_conversations("IEMOCAP", tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert str(feature_path if which == "feature" else roberta_path) in message
    if vid is not None:
        assert repr(vid) in message
    assert phrase in message


def test_bad_meld_speaker_vector(meld_dir, tmp_path):
    feature_path, _ = _copy(meld_dir, tmp_path, "MELD")
    feature = _read(feature_path)
    vid = feature[7][0]
    feature[1][vid][0] = [1] * 9
    _write(feature_path, feature)
    expected = f"{feature_path}: dialogue {vid}: videoSpeakers: utterance 0 is not a one-hot"
    with pytest.raises(DataError, match=re.escape(expected)):
        load_conversations("MELD", tmp_path)


def test_missing_files_say_how_to_generate_only_when_both_are_missing(tiny_iemocap, tmp_path):
    feature_path, roberta_path = _copy(tiny_iemocap, tmp_path, "IEMOCAP")
    roberta_path.unlink()
    with pytest.raises(DataError) as info:
        load_conversations("IEMOCAP", tmp_path)
    message = str(info.value)
    assert str(roberta_path) in message and "iemocap_features_roberta.pkl" in message
    # The other file may be real: no command that would write over it.
    assert "dataloader.synthetic" not in message and message.endswith("put the missing file beside the other one")
    feature_path.unlink()
    with pytest.raises(DataError) as info:
        load_conversations("IEMOCAP", tmp_path)
    assert str(info.value).endswith(f"python -m dataloader.synthetic --Dataset IEMOCAP --out {tmp_path}")


def test_unreadable_pickle(tiny_iemocap, tmp_path):
    feature_path, _ = _copy(tiny_iemocap, tmp_path, "IEMOCAP")
    feature_path.write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="cannot read the pickle"):
        load_conversations("IEMOCAP", tmp_path)


# ------------------------------------------------------------------ CLI

def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dataloader", *args], cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)


def test_cli_stops_quietly_when_its_reader_goes_away(meld_dir):
    """`python -m dataloader ... | head -1`: no traceback."""
    with subprocess.Popen([sys.executable, "-m", "dataloader", "--Dataset", "MELD", "--data-dir", str(meld_dir)],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as cli:
        cli.stdout.close()                      # gone before the tool has printed anything
        stderr = cli.stderr.read()
    assert (cli.returncode, stderr) == (1, "")


def test_cli_finds_the_data_where_training_does(meld_dir, tmp_path, monkeypatch):
    """Without --data-dir: the current folder, else the repository's data/ (find_data_dir)."""
    result = _cli("--Dataset", "MELD", "--json", cwd=meld_dir)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["dataset"] == "MELD"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "REPO_DATA", meld_dir)
    assert find_data_dir("MELD") == meld_dir
    monkeypatch.setattr(datasets, "REPO_DATA", tmp_path / "data")
    with pytest.raises(DataError, match=r"^no MELD_features/ in the current directory or in .*/data: pass --data-dir, "
                                        r"or make synthetic features with: python -m dataloader.synthetic --Dataset MELD"):
        find_data_dir("MELD")
    assert find_data_dir("MELD", "elsewhere") == Path("elsewhere")


def test_cli_json_summary(meld_dir):
    result = _cli("--Dataset", "MELD", "--data-dir", str(meld_dir), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    conv = load_conversations("MELD", meld_dir)
    assert summary == {
        "dataset": "MELD",
        "splits": {s: {"dialogues": len(conv.splits[s]), "utterances": conv.utterances(s)}
                   for s in ("train", "test")},
        "dims": {"text": 1024, "audio": 300, "visual": 342},
        "class_counts": {s: conv.class_counts(s).tolist() for s in ("train", "test")},
        "speakers": 9,
    }


def test_cli_bad_data_exits_2_without_traceback(tiny_iemocap, tmp_path):
    feature_path, _ = _copy(tiny_iemocap, tmp_path, "IEMOCAP")
    feature = _read(feature_path)
    vid = feature[7][0]
    feature[2][vid] = [9] * len(feature[2][vid])
    _write(feature_path, feature)
    for data_dir in (tmp_path, tmp_path / "nowhere"):
        result = _cli("--Dataset", "IEMOCAP", "--data-dir", str(data_dir), "--json")
        assert result.returncode == 2
        assert result.stdout == ""
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert repr(vid) in _cli("--Dataset", "IEMOCAP", "--data-dir", str(tmp_path)).stderr
