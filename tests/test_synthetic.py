"""The synthetic generator: public layouts, real-size statistics, determinism, imbalance."""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dataloader import __main__ as summary_cli
from dataloader import load_conversations, synthetic
from dataloader.datasets import DATASETS, DataError
from dataloader.synthetic import RECIPES, _layout, generate, probe

REPO = Path(__file__).resolve().parents[1]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _read(path: Path) -> tuple:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def test_same_seed_same_bytes(tmp_path):
    a = generate("IEMOCAP", tmp_path / "a", scale=0.02, seed=5)
    b = generate("IEMOCAP", tmp_path / "b", scale=0.02, seed=5)
    c = generate("IEMOCAP", tmp_path / "c", scale=0.02, seed=6)
    assert _files(a) == _files(b)
    assert all(x != y for x, y in zip(_files(a).values(), _files(c).values()))


def test_existing_other_data_is_kept_unless_overwrite(tmp_path):
    folder = generate("IEMOCAP", tmp_path, scale=0.02, seed=5)
    before = _files(folder)
    assert _files(generate("IEMOCAP", tmp_path, scale=0.02, seed=5)) == before   # a rerun: same bytes, fine
    with pytest.raises(DataError, match="already there with other contents .*pass --overwrite"):
        generate("IEMOCAP", tmp_path, scale=0.02, seed=6)
    assert _files(folder) == before and sorted(p.name for p in folder.iterdir()) == sorted(before)
    assert _files(generate("IEMOCAP", tmp_path, scale=0.02, seed=6, overwrite=True)) != before


def test_cli_writes_the_same_bytes_in_another_process(tmp_path):
    expected = generate("MELD", tmp_path / "here", scale=0.01, seed=3)
    result = subprocess.run(
        [sys.executable, "-m", "dataloader.synthetic", "--Dataset", "MELD",
         "--out", str(tmp_path / "there"), "--scale", "0.01", "--seed", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert _files(tmp_path / "there" / "MELD_features") == _files(expected)


def test_iemocap_public_layout(iemocap_dir):
    folder = iemocap_dir / "IEMOCAP_features"
    features = _read(folder / "IEMOCAP_features.pkl")
    roberta = _read(folder / "iemocap_features_roberta.pkl")
    assert len(features) == 9 and len(roberta) == 10
    ids, speakers, labels, text, audio, visual, sentences, train_vid, test_vid = features
    assert isinstance(train_vid, list) and isinstance(test_vid, list)
    assert set(ids) == set(train_vid) | set(test_vid)
    assert all(v.startswith("Ses05") for v in test_vid)
    for vid in train_vid + test_vid:
        n = len(labels[vid])
        assert set(speakers[vid]) <= {"M", "F"} and len(speakers[vid]) == n
        assert all(isinstance(x, int) for x in labels[vid])
        assert all(isinstance(s, str) for s in sentences[vid]) and len(ids[vid]) == n
        for table, dim in ((text, 100), (audio, 1582), (visual, 342)):
            assert isinstance(table[vid], list) and len(table[vid]) == n
            assert table[vid][0].shape == (dim,) and table[vid][0].dtype == np.float32
        for layer in roberta[2:6]:
            assert layer[vid].shape == (n, 1024) and layer[vid].dtype == np.float32
        assert roberta[0][vid] == speakers[vid] and roberta[1][vid] == labels[vid]
    train_ids, test_ids, valid_ids = roberta[7:]
    assert sorted(train_ids + valid_ids) == sorted(train_vid) and test_ids == test_vid


def test_meld_public_layout(meld_dir):
    folder = meld_dir / "MELD_features"
    features = _read(folder / "MELD_features_raw1.pkl")
    roberta = _read(folder / "meld_features_roberta.pkl")
    assert len(features) == 10 and len(roberta) == 11
    _, speakers, labels, text, audio, visual, _, train_vid, test_vid, sentiment = features
    for vid in train_vid + test_vid:
        n = len(labels[vid])
        onehot = np.array(speakers[vid])
        assert onehot.shape == (n, 9) and (onehot.sum(1) == 1).all()
        assert isinstance(speakers[vid][0], list)
        assert text[vid][0].shape == (600,) and audio[vid][0].shape == (300,)
        assert visual[vid][0].shape == (342,)
        assert set(sentiment[vid]) <= {0, 1, 2} and roberta[1][vid] == labels[vid]
        assert roberta[3][vid].shape == (n, 1024)
    assert sorted(roberta[8] + roberta[10]) == sorted(train_vid) and roberta[9] == test_vid


@pytest.mark.parametrize("dataset, sizes, longest", [
    ("IEMOCAP", (120, 31, 5810, 1623), 110),
    ("MELD", (1153, 280, 11098, 2610), 33),
])
def test_real_size_dialogue_statistics(dataset, sizes, longest):
    """Counts match the real datasets exactly; priors and persistence look like them."""
    recipe = RECIPES[dataset]
    layout = _layout(DATASETS[dataset], recipe, 1.0, np.random.default_rng(0))
    lengths = np.array([len(labels) for labels in layout.labels])
    n_train = len(layout.train_ids)
    assert (n_train, len(layout.test_ids), lengths[:n_train].sum(), lengths[n_train:].sum()) \
        == sizes
    assert lengths.max() <= longest
    if dataset == "MELD":
        assert (lengths == 1).any()
    labels = np.concatenate(layout.labels)
    np.testing.assert_allclose(np.bincount(labels) / len(labels), recipe.priors, atol=0.025)
    # A speaker's next utterance repeats their emotion far more often than chance.
    repeats = [a == b for turns, labs in zip(layout.speakers, layout.labels)
               for s in set(turns.tolist())
               for a, b in zip(labs[turns == s][:-1], labs[turns == s][1:])]
    chance = float((np.bincount(labels) / len(labels)) @ (np.bincount(labels) / len(labels)))
    assert np.mean(repeats) > chance + 0.3


def test_tiny_scale_keeps_two_train_and_one_test_dialogue(tmp_path):
    generate("MELD", tmp_path, scale=1e-6, seed=0)
    conv = load_conversations("MELD", tmp_path)
    assert (len(conv.splits["train"]), len(conv.splits["test"])) == (2, 1)


@pytest.mark.slow
def test_modality_imbalance_at_small_scale(tmp_path):
    """Text beats audio beats visual, and the three together beat text (fixed seed)."""
    generate("IEMOCAP", tmp_path, scale=0.2, seed=0)
    scores = probe("IEMOCAP", tmp_path)
    assert scores["text"] > scores["audio"] + 0.05
    assert scores["audio"] > scores["visual"] + 0.05
    assert scores["all"] > scores["text"] + 0.02


def test_synthetic_out_that_is_a_file_is_one_line(capsys, tmp_path):
    (tmp_path / "afile").write_text("")
    assert synthetic.main(["--Dataset", "MELD", "--out", str(tmp_path / "afile"), "--scale", "0.01"]) == 2
    assert capsys.readouterr().err == (f"error: --out {tmp_path / 'afile'}: cannot write "
                                       f"{tmp_path / 'afile' / 'MELD_features'} (Not a directory)\n")


@pytest.mark.parametrize("module, argv, message", [
    (synthetic, ["--Dataset", "MELD", "--out", "x", "--scale", "inf"], "--scale must be a positive number, got inf"),
    (synthetic, ["--Dataset", "MELD", "--out", "x", "--seed", "-1"], "--seed must be non-negative, got -1"),
    (synthetic, ["--Dataset", "MELD"], "--out is required (or use --probe [--data-dir DIR])"),
    (summary_cli, ["--data-dir", "x"], "the following arguments are required: --Dataset"),
])
def test_data_clis_report_bad_flags_in_one_line(capsys, tmp_path, monkeypatch, module, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        module.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err == f"error: {message} (see --help)\n"
    assert list(tmp_path.iterdir()) == []
