"""What each modality does on held-out splits: unimodal heads, coalition accuracies, their exact
Shapley values and per-class F1, logged for every evaluated split."""
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from dataloader.datasets import load_conversations
from dataloader.loaders import make_loaders
from model import M3Net, ModelConfig
from utils.training import main as entry
from utils.training.metrics import modality_diagnostics
from utils.training.trainer import evaluate

DEFAULTS = {"IEMOCAP": dict(seed=1475, use_modal=True, pareto_gamma=0.2, epochs=2),
            "MELD": dict(seed=67137, pareto_gamma=1.0, epochs=2)}


def test_two_modalities_by_hand():
    # Utterances 0..3; coalition rows in the model's order "la": ∅, {l}, {a}; the full one is `preds`.
    labels = np.array([0, 1, 2, 0])
    coalition_preds = np.array([[1, 0, 0, 1],      # ∅:   none right          -> 0 %
                                [0, 1, 0, 1],      # {l}: utterances 0, 1     -> 50 %
                                [0, 0, 1, 1]])     # {a}: utterance 0         -> 25 %
    preds = labels.copy()                          # {l, a}: all right        -> 100 %
    d = modality_diagnostics(labels, preds, {"a": np.array([0, 0, 0, 0]), "l": np.array([0, 1, 1, 1])},
                             coalition_preds, "la", "al", ("x", "y", "z"))
    assert d["coalition_acc"] == {"": 0.0, "l": 50.0, "a": 25.0, "al": 100.0}
    # φ_l = ½[(v(l) − v(∅)) + (v(al) − v(a))] = ½[50 + 75]; φ_a = ½[(v(a) − v(∅)) + (v(al) − v(l))] = ½[25 + 50]
    assert d["shapley"] == {"a": 37.5, "l": 62.5}
    assert list(d["shapley"]) == ["a", "l"]                                     # --modals order
    assert d["unimodal"]["a"]["acc"] == 50.0 and d["unimodal"]["l"]["acc"] == 50.0
    # Head l: class 0 P 1 R ½ -> F1 ⅔; class 1 P ⅓ R 1 -> F1 ½; class 2 never predicted -> 0.
    assert d["unimodal"]["l"]["macro_f1"] == pytest.approx(100 * (2 / 3 + 1 / 2 + 0) / 3, rel=1e-12)
    assert d["per_class_f1"] == {"x": 100.0, "y": 100.0, "z": 100.0}


def test_shapley_of_accuracy_is_symmetric_and_efficient_for_three_modalities():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 50)
    coalition_preds = rng.integers(0, 4, (7, 50))
    coalition_preds[2] = coalition_preds[1]          # {a} and {l} alike ...
    coalition_preds[6] = coalition_preds[5]          # ... and so {a, v} and {l, v} (rows: bit 0 l, bit 1 a, bit 2 v)
    preds = rng.integers(0, 4, 50)
    d = modality_diagnostics(labels, preds, {m: preds for m in "avl"}, coalition_preds, "lav", "avl",
                             tuple("abcd"))
    assert d["shapley"]["a"] == pytest.approx(d["shapley"]["l"], abs=1e-12)
    total = sum(d["shapley"].values())
    assert total == pytest.approx(d["coalition_acc"]["avl"] - d["coalition_acc"][""], abs=1e-12)
    assert d["coalition_acc"]["avl"] == 100 * np.mean(preds == labels)
    # φ_v from its definition: Σ_{S ∌ v} |S|!(2 − |S|)!/3! (v(S ∪ {v}) − v(S)).
    acc = d["coalition_acc"]
    phi_v = (2 * (acc["v"] - acc[""]) + (acc["av"] - acc["a"]) + (acc["vl"] - acc["l"])
             + 2 * (acc["avl"] - acc["al"])) / 6
    assert d["shapley"]["v"] == pytest.approx(phi_v, abs=1e-12)


@pytest.mark.parametrize("modals", ["avl", "al"])
def test_evaluate_logs_heads_and_coalitions_of_the_split(meld_dir, modals):
    data = load_conversations("MELD", meld_dir)
    loader = make_loaders(data, 4)["test"]
    torch.manual_seed(0)
    model = M3Net(ModelConfig(data.n_classes, data.n_speakers, data.dims["audio"], data.dims["visual"],
                              modals=modals)).eval()
    result = evaluate(model, loader, torch.nn.NLLLoss(), torch.device("cpu"), "MELD")
    labels, heads, fused = [], {m: [] for m in modals}, []
    with torch.no_grad():
        for batch in loader:
            # Independently of the model's output gathering: the encoder outputs at the real steps.
            real = batch.umask.t().bool()                                        # [T, B]
            encoded = model.encode(batch, model.graph_for(batch))
            order = real.t().nonzero()                                           # dialogue after dialogue
            for m in modals:
                z = encoded[m][order[:, 1], order[:, 0]]
                heads[m].append(getattr(model, f"head_{m}")(z).argmax(-1))
            labels.append(batch.labels[batch.umask.bool()])
            fused.append(model(batch).log_probs.argmax(-1))
    labels = torch.cat(labels).numpy()
    assert result["coalition_acc"][modals] == result["acc"] == 100 * np.mean(torch.cat(fused).numpy() == labels)
    assert set(result["coalition_acc"]) == ({"", "a", "v", "l", "av", "al", "vl", "avl"} if modals == "avl"
                                            else {"", "a", "l", "al"})
    assert sum(result["shapley"].values()) == pytest.approx(
        result["coalition_acc"][modals] - result["coalition_acc"][""], abs=1e-9)
    for m in modals:
        assert result["unimodal"][m]["acc"] == 100 * np.mean(torch.cat(heads[m]).numpy() == labels)
    f1 = 100 * f1_score(labels, result["preds"], labels=range(7), average=None, zero_division=0)
    assert list(result["per_class_f1"].values()) == f1.tolist()
    assert list(result["per_class_f1"]) == list(data.class_names)


def test_every_evaluated_split_is_logged_and_read_back_from_tensorboard(tmp_path, iemocap_dir, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    log_dir = tmp_path / "run"
    argv = ["--data-dir", str(iemocap_dir), "--log-dir", str(log_dir), "--batch-size", "4", "--no-cuda",
            "--epochs", "2", "--valid", "0.2", "--tensorboard"]
    entry.main("IEMOCAP", DEFAULTS["IEMOCAP"], argv)
    out = capsys.readouterr().out
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        for split in ("valid", "test"):
            r = record[split]
            assert r["coalition_acc"]["avl"] == r["acc"]
            assert sum(r["shapley"].values()) == pytest.approx(r["coalition_acc"]["avl"] - r["coalition_acc"][""],
                                                               abs=1e-9)
            assert set(r["unimodal"]) == set("avl") and set(r["per_class_f1"]) == {"hap", "sad", "neu", "ang",
                                                                                  "exc", "fru"}
        assert "unimodal" not in record["train"]
    line = next(line for line in out.splitlines() if line.startswith("epoch 2/2"))
    test_uni = records[1]["test"]["unimodal"]
    assert f"test unimodal acc a={test_uni['a']['acc']:.1f} v={test_uni['v']['acc']:.1f} l={test_uni['l']['acc']:.1f}" \
        in line
    summary = json.loads((log_dir / "summary.json").read_text())
    assert summary["metrics"]["test"]["shapley"] == records[summary["selected_epoch"]]["test"]["shapley"]

    events = EventAccumulator(str(log_dir))
    events.Reload()
    scalars = events.Tags()["scalars"]
    for tag, value in (("test/coalition_acc/none", records[1]["test"]["coalition_acc"][""]),
                       ("valid/shapley/l", records[1]["valid"]["shapley"]["l"]),
                       ("test/unimodal/a/acc", test_uni["a"]["acc"]),
                       ("test/per_class_f1/neu", records[1]["test"]["per_class_f1"]["neu"]),
                       ("train/weighted_f1", records[1]["train"]["weighted_f1"]),
                       ("modalities/l/coeff", records[1]["modalities"]["l"]["coeff"])):
        assert tag in scalars
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [0, 1]
        assert logged[1].value == pytest.approx(value, rel=2 ** -23)          # stored as float32

    test_dir = tmp_path / "test"
    entry.main("IEMOCAP", DEFAULTS["IEMOCAP"], ["--data-dir", str(iemocap_dir), "--log-dir", str(test_dir),
                                                "--no-cuda", "--batch-size", "4", "--testing", "--checkpoint", str(log_dir / "best.pt")])
    tested = json.loads((test_dir / "test_metrics.json").read_text())
    assert tested["shapley"] == summary["metrics"]["test"]["shapley"]
    assert tested["unimodal"] == summary["metrics"]["test"]["unimodal"]
