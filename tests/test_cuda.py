"""The same model, step and CLI on CUDA as on the CPU. Runs where a GPU is present (skipped elsewhere)."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from dataloader.datasets import load_conversations
from dataloader.loaders import make_loaders
from model.cuda_graphs import _GRAPHS, can_graph, context_rnn, graphed_rnn
from model.graph import build_graph
from model.m3net import M3Net, ModelConfig
from utils.training import main as entry
from utils.dgs.step import DGSSettings, DGSStep
from utils.dgs.ogm import modulate
from utils.dgs.segments import scale_segments_, segment_stds
from utils.dgs.shaping import shape_group, shape_groups
from utils.dgs.shaping_graph import ShapingGraphs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def full_float32():
    """Compare in true float32: no TF32 in cuBLAS or cuDNN (the GRU) during these tests."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _model_and_batch(data_dir, dataset: str, dropout: float = 0.5):
    data = load_conversations(dataset, data_dir)
    batch = next(iter(make_loaders(data, 4, shuffle_train=False)["train"]))
    torch.manual_seed(0)
    cfg = ModelConfig(data.n_classes, data.n_speakers, data.dims["audio"], data.dims["visual"],
                      use_modal=True, dropout=dropout)
    return M3Net(cfg), batch


def test_graphed_shaping_draws_what_the_eager_shaping_draws():
    """utils/dgs/shaping_graph.py against the eager flat shaping, OGM-GE's noise included: the same
    seed gives the same numbers, on the capturing call and on a replay."""
    torch.manual_seed(0)
    sizes = [[300000, 1, 4000], [5000, 7]]
    g_mm = [[torch.randn(n, device=CUDA) for n in group] for group in sizes]
    g_uni = [[torch.randn(n, device=CUDA) - 0.5 * g for n, g in zip(group, gm)] for group, gm in zip(sizes, g_mm)]
    coeff = torch.tensor([0.3, 0.9], device=CUDA)
    graphs = ShapingGraphs()
    for seed in (1, 2):
        torch.manual_seed(seed)
        got, got_cos = graphs(g_mm, g_uni, coeff, True, 0.8)
        torch.manual_seed(seed)
        want, want_cos = shape_groups(g_mm, g_uni, coeff, True, 0.8)
        for g, w in zip(got, want):     # the same draws; sums may differ in the last bit (other offsets)
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_cos, want_cos, rtol=1e-5, atol=1e-6)
    # The first replay agreed with the eager shaping (its check): the graph stays.
    assert graphs.take_notices() == [] and len(graphs.graphs) == 1
    assert next(iter(graphs.graphs.values())).checked
    first = graphs(g_mm, g_uni, coeff, True, 0.8)[0][0].clone()
    assert not torch.equal(first, graphs(g_mm, g_uni, coeff, True, 0.8)[0][0])   # each replay draws anew


def test_graph_structure_is_built_on_the_device():
    graph = build_graph((3, 1, 2), 3, CUDA)
    assert graph.node_ids.device.type == "cuda" and graph.flat_valid.device.type == "cuda"
    assert build_graph((3, 1, 2), 3, CUDA) is graph
    assert build_graph((3, 1, 2), 3, torch.device("cpu")).node_ids.device.type == "cpu"


def test_per_tensor_operations_on_cuda_match_the_cpu():
    # The GPU's whole-vector scaling (utils/dgs/segments.py) against the CPU's per-tensor one.
    torch.manual_seed(0)
    sizes = [5000, 1, 3, 120000]
    flat = torch.randn(sum(sizes)) * 2 + 7
    factors = torch.tensor([0.5, -2.0, 3.0, 1e-3])
    torch.testing.assert_close(segment_stds(flat.to(CUDA), sizes).cpu(), segment_stds(flat, sizes))
    torch.testing.assert_close(scale_segments_(flat.to(CUDA), sizes, factors.to(CUDA)).cpu(),
                               scale_segments_(flat.clone(), sizes, factors))
    noise = (modulate(flat.to(CUDA), sizes, torch.tensor(0.5, device=CUDA), True) - 0.5 * flat.to(CUDA)).cpu()
    parts, originals = noise.split(sizes), flat.split(sizes)
    for i in (0, 3):                 # each tensor's noise has its std; a one-element tensor gets none
        assert parts[i].std().item() == pytest.approx(originals[i].std().item(), rel=0.05)
    assert parts[1].item() == pytest.approx(0.0, abs=1e-5)


def test_group_shaping_on_cuda_matches_the_cpu():
    # shape_group is flat on the GPU and per tensor on the CPU (utils/dgs/shaping.py): no noise here.
    torch.manual_seed(0)
    sizes = [300000, 1, 4000]
    g_mm = [torch.randn(n) for n in sizes]
    g_uni = [torch.randn(n) - 0.5 * g for n, g in zip(sizes, g_mm)]
    cpu, cpu_cos = shape_group(g_mm, g_uni, torch.tensor(0.3), False, 0.8)
    gpu, gpu_cos = shape_group([g.to(CUDA) for g in g_mm], [g.to(CUDA) for g in g_uni],
                               torch.tensor(0.3, device=CUDA), False, 0.8)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-6)
    assert gpu_cos.item() == pytest.approx(cpu_cos.item(), abs=1e-5)


def test_forward_on_cuda_matches_the_cpu(iemocap_dir):
    model, batch = _model_and_batch(iemocap_dir, "IEMOCAP")
    model.eval()
    with torch.no_grad():
        cpu = model(batch)
        gpu = model.to(CUDA)(batch.to(CUDA))
    assert gpu.log_probs.device.type == "cuda"
    torch.testing.assert_close(gpu.log_probs.cpu(), cpu.log_probs, rtol=1e-4, atol=1e-4)
    for m in "lav":
        torch.testing.assert_close(gpu.unimodal_logits[m].cpu(), cpu.unimodal_logits[m], rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("error::UserWarning")   # e.g. autograd streams crossed by the graphs
def test_dgs_step_gradients_on_cuda_match_the_cpu(iemocap_dir):
    model, batch = _model_and_batch(iemocap_dir, "IEMOCAP", dropout=0.0)
    gpu_model = M3Net(model.cfg)
    gpu_model.load_state_dict(model.state_dict())
    gpu_model.to(CUDA)
    settings = DGSSettings(modulation="OGM", pareto_gamma=0.2)     # OGM: no noise, comparable
    grads, stats = {}, {}
    for name, m, b in (("cpu", model, batch), ("cuda", gpu_model, batch.to(CUDA))):
        step = DGSStep(m, torch.optim.SGD(m.parameters(), lr=0.0), torch.nn.NLLLoss(), settings)
        stats[name] = step(b, modulation_on=True)
        grads[name] = {n: p.grad.cpu() for n, p in m.named_parameters() if p.grad is not None}
        assert step.take_notices() == []                           # no graph went back to eager
    assert gpu_model.gru_l in _GRAPHS                              # the text GRU ran from CUDA graphs
    assert grads["cpu"].keys() == grads["cuda"].keys()
    for key in ("shapley", "coeff", "cos", "loss_mm"):
        # Shapley scores are differences of probabilities: compare absolutely.
        torch.testing.assert_close(stats["cuda"][key].cpu(), stats["cpu"][key], rtol=1e-3, atol=2e-4)
    for n, g in grads["cpu"].items():
        scale = g.abs().max().item() + 1e-12
        assert (grads["cuda"][n] - g).abs().max().item() <= 1e-3 * scale + 1e-7, n


def test_training_on_cuda_and_testing_from_its_checkpoint(capsys, tmp_path, meld_dir):
    run, tested, tested_cpu = tmp_path / "run", tmp_path / "test", tmp_path / "test_cpu"
    base = ["--data-dir", str(meld_dir), "--batch-size", "4"]
    defaults = dict(seed=67137, pareto_gamma=1.0, epochs=1)
    for argv in ([*base, "--log-dir", str(run)],
                 [*base, "--log-dir", str(tested), "--testing", "--checkpoint", str(run / "best.pt")],
                 [*base, "--log-dir", str(tested_cpu), "--testing", "--checkpoint", str(run / "best.pt"), "--no-cuda"]):
        try:
            entry.main("MELD", defaults, argv)
        except SystemExit as e:
            assert e.code in (0, None), capsys.readouterr().err
    assert "on cuda" in (run / "train.log").read_text()
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    on_gpu = json.loads((tested / "test_metrics.json").read_text())
    on_cpu = json.loads((tested_cpu / "test_metrics.json").read_text())
    assert on_gpu["weighted_f1"] == pytest.approx(record["test"]["weighted_f1"])
    agree = sum(a == b for a, b in zip(on_gpu["predictions"], on_cpu["predictions"])) / len(on_cpu["predictions"])
    assert agree >= 0.98


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """float32 on the GPU, TF32 off: an RNN from CUDA graphs against the same RNN run eagerly."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _rnn(kind=torch.nn.GRU, dropout: float = 0.0):
    torch.manual_seed(0)
    return kind(12, 8, num_layers=2, bidirectional=True, dropout=dropout).to(CUDA)


@pytest.mark.parametrize("kind", [torch.nn.GRU, torch.nn.LSTM])
def test_graphed_rnn_gives_the_modules_output_and_both_backward_passes(kind):
    """Shapes alternate (capture, capture, replay); two backwards through one forward, as a DGS
    step does: each must give the module's own gradients, the first not overwritten by the
    second (the graphs write to shared buffers)."""
    rnn = _rnn(kind)                            # training, no dropout: comparable
    module = copy.deepcopy(rnn)                 # the reference, weights laid out as nn.GRU has them
    module.flatten_parameters()
    for steps, batch in ((5, 3), (9, 3), (5, 3), (9, 2)):
        x = torch.randn(steps, batch, 12, device=CUDA, requires_grad=True)
        assert can_graph(rnn, x)
        want, got = module(x)[0], graphed_rnn(rnn, x)
        _assert_close(got, want)
        cotangents = torch.randn_like(want), torch.randn_like(want)
        got_grads = [torch.autograd.grad(got, [x, *rnn.parameters()], c, retain_graph=True) for c in cotangents]
        for c, grads in zip(cotangents, got_grads):
            for g_got, g_want in zip(grads, torch.autograd.grad(want, [x, *module.parameters()], c, retain_graph=True)):
                _assert_close(g_got, g_want)
    assert len(_GRAPHS[rnn].shapes) == 3
    # Each layer's weights in a cuDNN buffer of their own, so that no graph keeps a packed copy.
    storages = {layer: {p.untyped_storage().data_ptr() for n, p in rnn.named_parameters() if f"_l{layer}" in n}
                for layer in (0, 1)}
    assert len(storages[0]) == len(storages[1]) == 1 and storages[0] != storages[1]


def test_graphed_rnn_draws_a_new_dropout_mask_at_every_replay():
    rnn = _rnn(dropout=0.5)
    x = torch.randn(6, 4, 12, device=CUDA, requires_grad=True)
    first, second = graphed_rnn(rnn, x), graphed_rnn(rnn, x)
    assert (first - second).abs().max().item() > 1e-3
    torch.manual_seed(7)
    again = graphed_rnn(rnn, x)
    torch.manual_seed(7)
    torch.testing.assert_close(graphed_rnn(rnn, x), again, rtol=0, atol=0)   # seeded: reproducible
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # weights laid out per layer: nothing to pack
        eager = context_rnn(rnn, x, cuda_graphs=False)
    _assert_close(eager, again)             # the eager masks


def test_graphed_rnn_refuses_a_backward_after_a_later_forward():
    rnn = _rnn()
    x = torch.randn(4, 2, 12, device=CUDA, requires_grad=True)
    earlier = graphed_rnn(rnn, x)
    graphed_rnn(rnn, x)
    with pytest.raises(RuntimeError, match="later forward"):
        earlier.sum().backward()


def test_graphed_rnn_recaptures_when_the_parameters_move():
    rnn = _rnn()
    x = torch.randn(4, 2, 12, device=CUDA)
    graphed_rnn(rnn, x)
    rnn.double().float()                         # new parameter storage: the old graphs are stale
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(2)
        want = rnn(x)[0]
    _assert_close(graphed_rnn(rnn, x), want)
    with torch.no_grad():
        assert not can_graph(rnn, x)             # evaluation: no backward to prepare
        _assert_close(context_rnn(rnn, x), want)
    assert not can_graph(rnn.eval(), x)          # cuDNN has no backward outside training
    rnn.train().weight_ih_l0.requires_grad_(False)
    assert not can_graph(rnn, x)                 # a frozen parameter: no graphs


def test_graphed_rnn_backward_uses_the_forwards_dropout_mask():
    rnn = _rnn(dropout=0.5)
    x = torch.randn(6, 4, 12, device=CUDA, requires_grad=True)
    graphed_rnn(rnn, x)                          # captured; what follows is a replay
    torch.manual_seed(3)
    got = graphed_rnn(rnn, x)
    torch.manual_seed(3)
    want = context_rnn(rnn, x, cuda_graphs=False)  # eager, the same masks
    cotangent = torch.randn_like(want)
    inputs = [x, *rnn.parameters()]
    for g_got, g_want in zip(torch.autograd.grad(got, inputs, cotangent), torch.autograd.grad(want, inputs, cotangent)):
        _assert_close(g_got, g_want)


def test_graphed_rnn_reads_weights_updated_in_place():
    """The optimizer updates the weights in place between replays: no snapshot in the graphs."""
    rnn = _rnn()
    module = copy.deepcopy(rnn)
    module.flatten_parameters()
    x = torch.randn(5, 3, 12, device=CUDA, requires_grad=True)
    graphed_rnn(rnn, x)
    with torch.no_grad():
        for p in rnn.parameters():
            p.add_(0.1 * torch.randn_like(p))
    module.load_state_dict(rnn.state_dict())
    got, want = graphed_rnn(rnn, x), module(x)[0]
    assert len(_GRAPHS[rnn].shapes) == 1          # replayed, not captured again
    _assert_close(got, want)
    cotangent = torch.randn_like(want)
    for g_got, g_want in zip(torch.autograd.grad(got, [x, *rnn.parameters()], cotangent),
                             torch.autograd.grad(want, [x, *module.parameters()], cotangent)):
        _assert_close(g_got, g_want)


def test_dgs_training_with_cuda_graphs_matches_eager_training(iemocap_dir):
    """Several DGS steps that change the weights, over batches of different shapes, each seen
    twice (captured, then replayed): the same weights at the end with and without the graphs
    (the context RNN's and the gradient shaping's)."""
    model, _ = _model_and_batch(iemocap_dir, "IEMOCAP", dropout=0.0)
    batches = list(make_loaders(load_conversations("IEMOCAP", iemocap_dir), 2, shuffle_train=False)["train"])[:3]
    assert len({b.text.shape for b in batches}) > 1
    trained = {}
    for graphs in (True, False):
        gpu_model = M3Net(model.cfg)
        gpu_model.load_state_dict(model.state_dict())
        gpu_model.to(CUDA).cuda_graphs = graphs
        step = DGSStep(gpu_model, torch.optim.SGD(gpu_model.parameters(), lr=0.01), torch.nn.NLLLoss(),
                       DGSSettings(modulation="OGM", pareto_gamma=0.2))
        for batch in batches + batches:
            step(batch.to(CUDA), modulation_on=True)
        assert step.take_notices() == []                     # every first replay agreed with eager
        assert (gpu_model.gru_l in _GRAPHS) is graphs
        assert len(step.shaping_graphs.graphs) == graphs     # one kind of call: g_u and κ every step
        trained[graphs] = {n: p.detach().cpu() for n, p in gpu_model.named_parameters()}
    for n, p in trained[False].items():
        assert not torch.equal(p, model.state_dict()[n]) or "gru_l" not in n, n   # the GRU did learn
        scale = p.abs().max().item() + 1e-12
        assert (trained[True][n] - p).abs().max().item() <= 1e-4 * scale + 1e-6, n


def test_dgs_training_goes_on_eagerly_where_the_captures_fail(iemocap_dir, monkeypatch):
    """Every CUDA graph capture refused, as on a setup that cannot capture: the context RNN and the
    gradient shaping go back to eager, each says so once, and the training goes on to the
    weights of training without graphs (the RNN then as nn.GRU runs it, its weights laid out
    as nn.GRU lays them)."""
    model, _ = _model_and_batch(iemocap_dir, "IEMOCAP", dropout=0.0)
    batches = list(make_loaders(load_conversations("IEMOCAP", iemocap_dir), 2, shuffle_train=False)["train"])[:2]
    refusal = "CUDA error: operation not permitted when stream is capturing"

    def refused(*args, **kwargs):
        raise RuntimeError(f"{refusal}\nCUDA kernel errors might be asynchronously reported")
    trained = {}
    for graphs in (True, False):
        gpu_model = M3Net(model.cfg)
        gpu_model.load_state_dict(model.state_dict())
        gpu_model.to(CUDA).cuda_graphs = graphs
        step = DGSStep(gpu_model, torch.optim.SGD(gpu_model.parameters(), lr=0.01), torch.nn.NLLLoss(),
                       DGSSettings(modulation="OGM", pareto_gamma=0.2))
        with monkeypatch.context() as patch:
            patch.setattr(torch.cuda.CUDAGraph, "capture_begin", refused)
            for i, batch in enumerate(batches + batches):
                step(batch.to(CUDA), modulation_on=True)
                if graphs and i == 0:
                    assert step.take_notices() == [
                        f"CUDA graphs off for the context RNN gru_l: capturing its CUDA graphs failed ({refusal}); "
                        f"it runs eagerly for the rest of the run",
                        f"CUDA graphs off for the gradient shaping: capturing its CUDA graph failed ({refusal}); "
                        f"it runs eagerly for the rest of the run"]
        assert step.take_notices() == []
        assert gpu_model.gru_l not in _GRAPHS and step.shaping_graphs.graphs == {}
        trained[graphs] = {n: p.detach().cpu() for n, p in gpu_model.named_parameters()}
    for n, p in trained[False].items():
        scale = p.abs().max().item() + 1e-12
        assert (trained[True][n] - p).abs().max().item() <= 1e-4 * scale + 1e-6, n
