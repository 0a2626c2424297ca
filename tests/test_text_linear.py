"""--no-text_linear: upstream M3Net's MELD text path (no linear_l), against independent computations."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from dataloader.batch import Batch
from dataloader.datasets import load_conversations
from dataloader.loaders import make_loaders
from model.checkpoint import load_model_state
from model.m3net import M3Net, ModelConfig
from utils.training import main as entry
from utils.dgs.step import DGSSettings, DGSStep, make_optimizer

try:
    from tests import reference_m3net as ref
    from tests.entry_point import run_entry
except ImportError:  # tests/ on sys.path instead of the repo root
    import reference_m3net as ref
    from entry_point import run_entry

C, S, DA, DV = 5, 3, 8, 6
MELD_DEFAULTS = dict(seed=67137, pareto_gamma=1.0, epochs=1)
FAST = ["--batch-size", "4", "--no-cuda"]
# float64 throughout: its rounding at these sizes is ~1e-15 of values of order 1, while a wrong
# text path (linear_l applied, another norm) moves them by more than 0.01 (asserted).
TOL = dict(rtol=1e-9, atol=1e-9)


def make_batch(lengths, seed=0) -> Batch:
    """Sequence-first, zeros at padding (as the loader), float64; the text far from zero mean so
    that the padding's zeros weigh in the BN statistics."""
    g = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths)
    umask = torch.zeros(b, t, dtype=torch.float64)
    for i, n in enumerate(lengths):
        umask[i, :n] = 1.0
    pad = umask.t()[..., None]
    text = (torch.randn(4, t, b, 1024, generator=g, dtype=torch.float64) * 2.0 + 1.0) * pad
    speakers = torch.randint(0, S, (t, b), generator=g)
    return Batch(text=text, audio=torch.randn(t, b, DA, generator=g, dtype=torch.float64) * pad,
                 visual=torch.randn(t, b, DV, generator=g, dtype=torch.float64) * pad,
                 qmask=F.one_hot(speakers, S).double() * pad, umask=umask,
                 labels=torch.randint(0, C, (b, t), generator=g) * umask.long(), lengths=torch.tensor(lengths),
                 ids=[f"d{i}" for i in range(b)])


def make_model(seed=0, **kw) -> M3Net:
    """float64, with BN affine parameters away from (1, 0) so that the norm shows in the outputs."""
    torch.manual_seed(seed)
    kw.setdefault("dropout", 0.0)
    model = M3Net(ModelConfig(n_classes=C, n_speakers=S, audio_dim=DA, visual_dim=DV, **kw)).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for s in "abcd":
            bn = getattr(model, f"normBN{s}")
            bn.weight.copy_(torch.rand(1024, generator=g, dtype=torch.float64) + 0.5)
            bn.bias.copy_(torch.randn(1024, generator=g, dtype=torch.float64))
    return model


def normalised_mean(model: M3Net, text: torch.Tensor) -> torch.Tensor:
    """The mean of the four BN-normalised layers [T, B, 1024], written out: in training with the
    statistics over all T·B positions (padding included), in evaluation with the running ones."""
    layers = []
    for k, s in enumerate("abcd"):
        bn = getattr(model, f"normBN{s}")
        if model.training:
            flat = text[k].reshape(-1, 1024)
            mean, var = flat.mean(0), flat.var(0, unbiased=False)
        else:
            mean, var = bn.running_mean, bn.running_var
        layers.append((text[k] - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias)
    return sum(layers) / 4


@pytest.mark.parametrize("base_model", ["GRU", "LSTM"])
def test_text_encoder_without_linear_l_is_the_rnn_of_the_normalised_mean(base_model):
    # GRU: model/rnn.py's GRU on the distinct rows; LSTM: torch's LSTM on the padded batch.
    model = make_model(base_model=base_model, text_linear=False).train()
    rnn = getattr(model, f"{base_model.lower()}_l")
    batch = make_batch((5, 1, 3), seed=1)
    valid = batch.umask.t().bool()
    group = model.encoder_groups()["l"]
    assert {id(p) for p in group} == {id(p) for p in [*rnn.parameters(), *(
        p for s in "abcd" for p in getattr(model, f"normBN{s}").parameters())]}
    z = model.encode(batch, model.graph_for(batch))["l"]
    want = rnn(normalised_mean(model, batch.text))[0]        # torch's own RNN over the padded batch
    ref.assert_close(z[valid], want[valid], **TOL)           # encoder outputs at padding are never read
    with_linear = rnn(model.linear_l(normalised_mean(model, batch.text)))[0]
    assert (with_linear[valid] - want[valid]).abs().max() > 0.01
    # The gradients of the text group (the RNN, the BNs) are those of the plain computation.
    cotangent = torch.randn(z[valid].shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = torch.autograd.grad((z[valid] * cotangent).sum(), group)
    expected = torch.autograd.grad((want[valid] * cotangent).sum(), group)
    for g_got, g_want in zip(got, expected):
        ref.assert_close(g_got, g_want, **TOL)


def test_upstream_meld_state_dict_predicts_without_its_linear_l():
    # An upstream MELD model carries linear_l untrained: its weights load but change nothing.
    upstream = make_model(seed=3)
    state = {k: v for k, v in upstream.state_dict().items() if not k.startswith("head_")}
    model = make_model(seed=4, text_linear=False)
    assert sorted(load_model_state(model, state)) == sorted(f"head_{m}.{p}" for m in "avl" for p in ("weight", "bias"))
    assert torch.equal(model.linear_l.weight, upstream.linear_l.weight) and not model.linear_l.weight.requires_grad
    lengths = (4, 1, 3)
    with torch.no_grad():
        model.train()(make_batch((3, 2), seed=5))            # BN running statistics away from (0, 1)
        model.eval()
        batch = make_batch(lengths, seed=6)
        out = model(batch)
        got = out.log_probs
        # Nodes written out in the reference's padded layout [B, M, T, D], modalities l, a, v.
        text = model.gru_l(normalised_mean(model, batch.text))[0]
        text = text + model.graph_model.speaker_embeddings(batch.qmask.argmax(-1))
        nodes = torch.stack([text, model.linear_a(batch.audio), model.linear_v(batch.visual)]).permute(2, 0, 1, 3)
        ref.assert_close(out.nodes, out.graph.gather_nodes(nodes), **TOL)
        want = ref.fuse(model, nodes, lengths)
        # The graph's degree factors are float32 (model/graph.py): 2^-23 relative per product, as
        # tests/test_graph.py's float64 comparison of the graph stage allows.
        ref.assert_close(got, want, rtol=1e-6, atol=1e-7)
        model.linear_l.weight.normal_()
        assert torch.equal(model(batch).log_probs, got)
        model.cfg = dataclasses.replace(model.cfg, text_linear=True)     # DGS's path through that linear_l
        assert (model(batch).log_probs - got).abs().max() > 0.01


@pytest.fixture(scope="module")
def meld_batch(meld_dir):
    data = load_conversations("MELD", meld_dir)
    return data, next(iter(make_loaders(data, 3, shuffle_train=False)["train"]))


# LN2 has no parameters: the text RNN's input then needs no gradient at all.
@pytest.mark.parametrize("settings,norm", [(DGSSettings(), "BN"),
                                           (DGSSettings(pareto=False, shapley=False, modulation="Normal"), "BN"),
                                           (DGSSettings(), "LN2")], ids=["MMPareto+OGM_GE", "plain", "LN2"])
def test_dgs_steps_leave_linear_l_untouched(meld_batch, settings, norm):
    data, batch = meld_batch
    torch.manual_seed(7)
    model = M3Net(ModelConfig(data.n_classes, data.n_speakers, data.dims["audio"], data.dims["visual"],
                              norm=norm, dropout=0.0, text_linear=False)).train()
    linear_l = list(model.linear_l.parameters())
    before = [p.detach().clone() for p in linear_l]
    gru_before = model.gru_l.weight_ih_l0.detach().clone()
    # Weight decay large enough to move any parameter Adam decays.
    step = DGSStep(model, make_optimizer(model, lr=1e-3, weight_decay=0.5), torch.nn.NLLLoss(), settings)
    ids = {id(p) for p in linear_l}
    assert not ids & {id(p) for p in [*step.params, *step.fusion_params, *step.encoder_params, *step.groups["l"]]}
    for _ in range(2):
        step(batch, modulation_on=True)
    for p, old in zip(linear_l, before):
        assert p.grad is None and torch.equal(p, old)
    assert not torch.equal(model.gru_l.weight_ih_l0, gru_before)    # the rest of the text encoder trains


def run_main(capsys, argv):
    return run_entry(capsys, "MELD", MELD_DEFAULTS, argv)


def test_a_no_text_linear_run_keeps_linear_l_and_its_checkpoint_needs_the_flag(capsys, tmp_path, meld_dir):
    data = load_conversations("MELD", meld_dir)
    torch.manual_seed(8)
    upstream = M3Net(ModelConfig(7, 9, data.dims["audio"], data.dims["visual"]))
    start = tmp_path / "best_model.pth.tar"
    torch.save({k: v for k, v in upstream.state_dict().items() if not k.startswith("head_")}, start)
    train_dir = tmp_path / "train"
    status, out, err = run_main(capsys, ["--data-dir", str(meld_dir), "--log-dir", str(train_dir), *FAST,
                                         "--checkpoint", str(start), "--no-text_linear"])
    assert status == 0, err
    assert ("; a raw state_dict does not tell --use_speaker --no-use_modal --norm BN --no-text_linear from other "
            "values of these flags: they must be those it was trained with") in out
    assert " --no-text_linear" in next(line for line in out.splitlines() if line.startswith("flags: "))
    for name in ("best.pt", "last.pt"):
        saved = torch.load(train_dir / name, weights_only=False)["model"]
        assert torch.equal(saved["linear_l.weight"], upstream.linear_l.weight), name
        assert torch.equal(saved["linear_l.bias"], upstream.linear_l.bias), name
        assert not torch.equal(saved["gru_l.weight_hh_l0"], upstream.gru_l.weight_hh_l0), name
    best = train_dir / "best.pt"
    argv = ["--testing", "--checkpoint", str(best), "--data-dir", str(meld_dir), *FAST]
    status, _, err = run_main(capsys, [*argv, "--log-dir", str(tmp_path / "t1")])
    assert status == 2
    assert err.strip() == (f"error: checkpoint {best} was trained with --no-text_linear, this run has "
                           f"--text_linear: give the checkpoint's flags")
    assert not (tmp_path / "t1").exists()
    status, _, err = run_main(capsys, [*argv, "--no-text_linear", "--log-dir", str(tmp_path / "t2")])
    assert status == 0, err
    record = json.loads((train_dir / "metrics.jsonl").read_text().splitlines()[0])
    result = json.loads((tmp_path / "t2" / "test_metrics.json").read_text())
    assert result["weighted_f1"] == pytest.approx(record["test"]["weighted_f1"])


def test_a_checkpoint_saved_before_the_flag_was_trained_with_linear_l(capsys, tmp_path, meld_dir):
    data = load_conversations("MELD", meld_dir)
    args = vars(entry.parse_args("MELD", MELD_DEFAULTS, []))
    del args["text_linear"]
    path = tmp_path / "best.pt"
    torch.save({"model": M3Net(ModelConfig(7, 9, data.dims["audio"], data.dims["visual"])).state_dict(),
                "args": args}, path)
    argv = ["--testing", "--checkpoint", str(path), "--data-dir", str(meld_dir), *FAST]
    status, _, err = run_main(capsys, [*argv, "--no-text_linear", "--log-dir", str(tmp_path / "t1")])
    assert status == 2
    assert err.strip() == (f"error: checkpoint {path} was trained with --text_linear, this run has "
                           f"--no-text_linear: give the checkpoint's flags")
    assert not (tmp_path / "t1").exists()
    status, _, err = run_main(capsys, [*argv, "--log-dir", str(tmp_path / "t2")])
    assert status == 0, err
