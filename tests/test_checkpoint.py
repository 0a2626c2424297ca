"""Checkpoint compatibility with M3Net and checkpoint I/O."""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dataloader.batch import Batch
from model.checkpoint import CheckpointError, load_model_state, read_checkpoint, save_atomic
from model.m3net import M3Net, ModelConfig
from utils.errors import UserError

IEMOCAP = dict(n_classes=6, n_speakers=2, audio_dim=1582, visual_dim=342)
MELD = dict(n_classes=7, n_speakers=9, audio_dim=300, visual_dim=342)

# Keys of the public M3Net checkpoint that its forward never reads.
IGNORED = {
    "graph_model.hyperconv1.weight": (1024, 512),
    "graph_model.hyperconv1.edgeweight": (512, 1),
    "graph_model.hyperconv1.edgefc.weight": (512, 1024),
    "graph_model.hyperedge_attr1": (512,),
    "graph_model.hyperedge_attr2": (512,),
    "hidfc.weight": (512, 3072),
    "hidfc.bias": (512,),
}
HEADS = {f"head_{m}.{p}" for m in "avl" for p in ("weight", "bias")}
AV_HEADS = {k for k in HEADS if not k.startswith("head_l")}
# Tests about key handling use modals 'av' (no 1024-d text encoder: the suite stays fast).
AV = dict(modals="av")


def build(seed: int, dataset=IEMOCAP, **kw) -> M3Net:
    torch.manual_seed(seed)
    kw.setdefault("dropout", 0.0)
    return M3Net(ModelConfig(**dataset, **kw))


def make_batch(lengths, dataset=IEMOCAP, seed=0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths)
    umask = torch.zeros(b, t)
    for i, n in enumerate(lengths):
        umask[i, :n] = 1.0
    pad = umask.t()[..., None]
    s = dataset["n_speakers"]
    return Batch(text=torch.randn(4, t, b, 1024, generator=g) * pad + 0.5 * pad,
                 audio=torch.randn(t, b, dataset["audio_dim"], generator=g) * pad,
                 visual=torch.randn(t, b, dataset["visual_dim"], generator=g) * pad,
                 qmask=F.one_hot(torch.randint(0, s, (t, b), generator=g), s).float() * pad,
                 umask=umask, labels=torch.zeros(b, t, dtype=torch.long), lengths=torch.tensor(lengths),
                 ids=list(range(b)))


def trained_like(model: M3Net, seed: int) -> M3Net:
    """Non-default BN running statistics and graph weights, so a faulty load shows in the outputs."""
    model.train()
    with torch.no_grad():
        model(make_batch((4, 2, 3), seed=seed))
        g = torch.Generator().manual_seed(seed)
        gm = model.graph_model
        gm.hyperedge_weight.copy_(torch.rand(1000, generator=g) + 0.5)
        gm.EW_weight.copy_(torch.rand(5200, generator=g) + 0.5)
    return model.eval()


def m3net_state(model: M3Net) -> dict:
    """What the public checkpoint looks like: no DGS heads, plus the never-read keys."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head_")}
    g = torch.Generator().manual_seed(99)
    state.update({k: torch.randn(shape, generator=g) for k, shape in IGNORED.items()})
    return state


# =========================================================================== names and shapes
def test_parameter_names_and_shapes_match_m3net():
    model = build(0, num_L=3, num_K=4)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = {
        "normBNa.weight": (1024,), "normBNd.running_var": (1024,), "normLNa.weight": (1024,),
        "normLNd.bias": (1024,), "linear_a.weight": (1024, 1582), "linear_v.weight": (1024, 342),
        "linear_l.weight": (1024, 1024), "gru_l.weight_ih_l0": (1536, 1024), "gru_l.weight_hh_l1_reverse": (1536, 512),
        "graph_model.modal_embeddings.weight": (3, 1024), "graph_model.speaker_embeddings.weight": (2, 1024),
        "graph_model.fc1.weight": (512, 1024), "graph_model.hyperconv1.bias": (512,),
        "graph_model.hyperconv3.bias": (512,), "graph_model.hyperedge_weight": (1000,),
        "graph_model.EW_weight": (5200,), "graph_model.conv1.gate.weight": (1, 1024),
        "graph_model.conv4.gate.bias": (1,), "smax_fc.weight": (6, 3072), "head_a.weight": (6, 1024),
    }
    for k, shape in want.items():
        assert shapes.get(k) == shape, k
    assert "graph_model.hyperconv4.bias" not in shapes and "graph_model.conv5.gate.weight" not in shapes
    # no dead parameters for the keys M3Net carries but never reads
    assert not [k for k in shapes if k in IGNORED or "edgefc" in k or "hyperedge_attr" in k
                or k.startswith("hidfc") or re.match(r"graph_model\.hyperconv\d+\.(weight|edgeweight)$", k)]


# =========================================================================== loading the M3Net checkpoint
def test_m3net_state_dict_loads_and_reproduces_outputs(tmp_path):
    src = trained_like(build(1), seed=1)
    path = tmp_path / "best_model.pth.tar"
    torch.save(m3net_state(src), path)

    dst = build(2).eval()
    heads_before = {k: v.clone() for k, v in dst.state_dict().items() if k in HEADS}
    batch = make_batch((3, 1, 5), seed=3)
    with torch.no_grad():
        want = src(batch)
        assert not torch.allclose(dst(batch).log_probs, want.log_probs)

    ckpt = read_checkpoint(path)
    assert set(ckpt) == {"model"}
    fresh = load_model_state(dst, ckpt["model"])
    assert sorted(fresh) == sorted(HEADS)

    after = dst.state_dict()
    assert not set(after) & set(IGNORED)
    for k, v in src.state_dict().items():
        if k in HEADS:
            assert torch.equal(after[k], heads_before[k]), k      # left as initialised, not copied
        else:
            assert torch.equal(after[k], v), k
    with torch.no_grad():
        got = dst(batch)
    assert torch.equal(got.log_probs, want.log_probs)
    assert not torch.equal(got.unimodal_logits["l"], want.unimodal_logits["l"])


def test_dataparallel_prefixed_state_dict_loads(tmp_path):
    src = trained_like(build(3, **AV), seed=3)
    path = tmp_path / "dp.pth.tar"
    torch.save({f"module.{k}": v for k, v in m3net_state(src).items()}, path)
    dst = build(4, **AV).eval()
    assert sorted(load_model_state(dst, read_checkpoint(path)["model"])) == sorted(AV_HEADS)
    batch = make_batch((2, 4), seed=4)
    with torch.no_grad():
        assert torch.equal(dst(batch).log_probs, src(batch).log_probs)


def test_own_checkpoint_format_round_trips(tmp_path):
    src = trained_like(build(5, **AV), seed=5)
    path = tmp_path / "best.pt"
    save_atomic({"model": src.state_dict(), "epoch": 7, "best_f1": 0.61}, path)
    ckpt = read_checkpoint(path)
    assert ckpt["epoch"] == 7 and ckpt["best_f1"] == pytest.approx(0.61)
    dst = build(6, **AV).eval()
    assert load_model_state(dst, ckpt["model"]) == []             # heads included: nothing fresh
    batch = make_batch((3,), seed=5)
    with torch.no_grad():
        out_src, out_dst = src(batch), dst(batch)
    assert torch.equal(out_dst.log_probs, out_src.log_probs)
    for m in "av":
        assert torch.equal(out_dst.unimodal_logits[m], out_src.unimodal_logits[m])


# =========================================================================== mismatches
MISMATCHES = [
    # (checkpoint model, command-line model, fragments the message must contain)
    (dict(num_L=3, **AV), dict(num_L=1, **AV), ["--num_L 3", "graph_model.hyperconv2.bias", "graph_model.hyperconv3.bias"]),
    (dict(num_L=1, **AV), dict(num_L=2, **AV), ["--num_L 1", "missing", "graph_model.hyperconv2.bias"]),
    (dict(num_K=2, **AV), dict(num_K=1, **AV), ["--num_K 2", "graph_model.conv2.gate.weight"]),
    (dict(base_model="LSTM"), dict(base_model="GRU"), ["--base-model LSTM", "lstm_l.", "gru_l."]),
    (dict(dataset=MELD, **AV), dict(**AV), ["--Dataset", "graph_model.speaker_embeddings.weight", "linear_a.weight",
                                  "smax_fc.weight"]),
]


@pytest.mark.parametrize("theirs,ours,fragments", MISMATCHES,
                         ids=["num_L 3->1", "num_L 1->2", "num_K", "LSTM->GRU", "MELD->IEMOCAP"])
def test_mismatch_names_keys_and_fixing_flag(theirs, ours, fragments):
    state = m3net_state(build(7, **theirs))       # (file reading is covered above)
    dst = build(8, **ours)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_model_state(dst, state)
    msg = str(err.value)
    assert isinstance(err.value, UserError)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    # nothing half-loaded
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())


def test_unknown_key_is_an_error_not_ignored():
    model = build(9, **AV)
    state = m3net_state(model)
    state["graph_model.hyperconv1.lin.weight"] = torch.zeros(3)     # not one of the never-read keys
    with pytest.raises(CheckpointError, match=r"graph_model\.hyperconv1\.lin\.weight"):
        load_model_state(model, state)


# =========================================================================== unreadable files
def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint(tmp_path / "nope.pth.tar")


@pytest.mark.parametrize("kind", ["garbage", "truncated", "list", "object"])
def test_unreadable_checkpoint(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "garbage":
        path.write_bytes(b"this is not a checkpoint\x00\x01\x02")
    elif kind == "truncated":
        torch.save({"w": torch.randn(1000)}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "list":
        torch.save([torch.zeros(2)], path)
    else:
        torch.save({"args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert str(path) in str(err.value)
    assert isinstance(err.value, UserError)
    if kind == "garbage":
        assert str(err.value).endswith("not a PyTorch checkpoint (neither torch.save's zip format nor a pickle)")


def test_a_text_file_given_as_checkpoint_is_named_as_such(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0}\n')
    with pytest.raises(CheckpointError, match=r"metrics.jsonl: not a PyTorch checkpoint"):
        read_checkpoint(path)


# =========================================================================== atomic writes
def test_save_atomic_writes_a_second_path_once_and_after_the_first(tmp_path, monkeypatch):
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    save_atomic({"epoch": torch.tensor(0)}, last, also=best)
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]
    assert os.path.samefile(last, best)                       # one file written, linked
    save_atomic({"epoch": torch.tensor(1)}, last)              # not the best epoch: best.pt keeps epoch 0
    assert torch.load(best, weights_only=True)["epoch"].item() == 0
    assert torch.load(last, weights_only=True)["epoch"].item() == 1
    (tmp_path / ".best.pt.tmp").write_bytes(b"left by a killed save")
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append(Path(b).name), real_replace(a, b)))
    monkeypatch.setattr(os, "link", lambda a, b: (_ for _ in ()).throw(OSError("no links here")))
    save_atomic({"epoch": torch.tensor(2)}, last, also=best)   # a file system without links: a copy
    assert renamed == ["last.pt", "best.pt"]                   # a crash between keeps best.pt older
    assert not os.path.samefile(last, best) and sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]
    assert [torch.load(p, weights_only=True)["epoch"].item() for p in (best, last)] == [2, 2]


def test_save_atomic_replaces_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic({"step": torch.tensor(1)}, path)
    assert os.listdir(tmp_path) == ["last.pt"]
    save_atomic({"step": torch.tensor(2)}, path)
    assert os.listdir(tmp_path) == ["last.pt"]
    assert torch.load(path, weights_only=True)["step"].item() == 2
    # readable as any new file is (the umask decides), not only by its owner
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    # what a killed save left behind is replaced by the next one
    (tmp_path / ".last.pt.tmp").write_bytes(b"half a checkpoint")
    save_atomic({"step": torch.tensor(2)}, path)
    assert os.listdir(tmp_path) == ["last.pt"]
    # a failing save keeps the previous file intact and cleans up its temp file
    with pytest.raises(Exception):
        save_atomic({"step": torch.tensor(3), "bad": lambda: None}, path)
    assert os.listdir(tmp_path) == ["last.pt"]
    assert torch.load(path, weights_only=True)["step"].item() == 2
