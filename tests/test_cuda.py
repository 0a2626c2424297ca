"""The same model, step and CLI on CUDA as on the CPU. Runs where a GPU is present (skipped elsewhere)."""
from __future__ import annotations

import json

import pytest
import torch

from dataloader.datasets import load_conversations
from dataloader.loaders import make_loaders
from model.graph import build_graph
from model.m3net import M3Net, ModelConfig
from utils import main as entry
from utils.dgs import DGSSettings, DGSStep
from utils.modulation import modulate
from utils.segments import scale_segments_, segment_stds
from utils.shaping import shape_group

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


def test_graph_structure_is_built_on_the_device():
    graph = build_graph((3, 1, 2), 3, CUDA)
    assert graph.node_ids.device.type == "cuda" and graph.flat_valid.device.type == "cuda"
    assert build_graph((3, 1, 2), 3, CUDA) is graph
    assert build_graph((3, 1, 2), 3, torch.device("cpu")).node_ids.device.type == "cpu"


def test_per_tensor_operations_on_cuda_match_the_cpu():
    # The GPU's whole-vector scaling (utils/segments.py) against the CPU's per-tensor one.
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
    # shape_group is flat on the GPU and per tensor on the CPU (utils/shaping.py): no noise here.
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
