"""--no-unimodal-loss (the "joint" baseline): the encoders learn from L_mm alone, the heads still from L_m."""
import pytest
import torch

from dataloader.datasets import load_conversations
from dataloader.loaders import make_loaders
from model import M3Net, ModelConfig
from utils.training import main as entry
from utils.dgs.step import DGSSettings, DGSStep, utterance_labels
from utils.dgs.step import unimodal_losses


def test_encoders_get_the_multimodal_gradient_alone_and_heads_the_unimodal_one(meld_dir):
    data = load_conversations("MELD", meld_dir)
    batch = next(iter(make_loaders(data, 3, shuffle_train=False)["train"]))
    batch = batch._map_tensors(lambda t: t.double() if t.is_floating_point() else t)
    torch.manual_seed(0)
    model = M3Net(ModelConfig(data.n_classes, data.n_speakers, data.dims["audio"], data.dims["visual"],
                              dropout=0.0)).double()
    loss_mm = torch.nn.NLLLoss()
    settings = DGSSettings(pareto=False, shapley=False, modulation="Normal", unimodal_loss=False)
    step = DGSStep(model, torch.optim.SGD(model.parameters(), lr=0.0), loss_mm, settings)
    step(batch, modulation_on=False)
    # The same batch again, by hand: ∂L_mm for everything but the heads, ∂L_m for head m.
    out = model(batch)
    labels = utterance_labels(batch, out)
    encoders = [p for group in model.encoder_groups().values() for p in group]
    expected = torch.autograd.grad(loss_mm(out.log_probs, labels), encoders, retain_graph=True)
    for p, g in zip(encoders, expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
    for m, loss in unimodal_losses(out.unimodal_logits, labels).items():
        head = list(getattr(model, f"head_{m}").parameters())
        for p, g in zip(head, torch.autograd.grad(loss, head, retain_graph=True)):
            torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
    # With the unimodal loss (plain), an encoder's gradient is another one.
    plain = DGSStep(model, torch.optim.SGD(model.parameters(), lr=0.0), loss_mm,
                    DGSSettings(pareto=False, shapley=False, modulation="Normal"))
    plain(batch, modulation_on=False)
    assert (model.linear_a.weight.grad - expected[[id(p) for p in encoders].index(id(model.linear_a.weight))]).abs().max() > 1e-6


def test_no_unimodal_loss_needs_no_pareto(capsys):
    with pytest.raises(SystemExit) as exit_info:
        entry.main("MELD", dict(seed=67137), ["--no-unimodal-loss"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("error: --no-unimodal-loss leaves MMPareto no unimodal gradient to merge: "
                                       "add --no-pareto\n")
