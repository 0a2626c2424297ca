"""The DGS step's gradients, and full runs of the entry point: outputs, resume, testing, errors."""
import dataclasses
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dataloader.datasets import load_conversations
from dataloader.loaders import make_loaders
from model import M3Net, ModelConfig
from model import graph, m3net, rnn
from utils.dgs import step as dgs
from utils.dgs.ogm import ogm_coefficients
from utils.dgs.step import DGSSettings, DGSStep, modality_scores, unimodal_losses, utterance_labels
from utils.training import main as entry
from utils.training.config import as_command_line
from utils.training.runlog import RunLog
from utils.training.trainer import EpochStats, evaluate

try:
    from tests.entry_point import run_entry
    from tests.reference_shaping import cosine_reference, shaping_reference
    from tests.tolerance import assert_within, float64_error, rounded, summation_gamma
except ImportError:  # tests/ on sys.path instead of the repo root
    from entry_point import run_entry
    from reference_shaping import cosine_reference, shaping_reference
    from tolerance import assert_within, float64_error, rounded, summation_gamma

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = {"IEMOCAP": dict(seed=1475, use_modal=True, pareto_gamma=0.2, epochs=2),
            "MELD": dict(seed=67137, pareto_gamma=1.0, epochs=2)}
FAST = ["--batch-size", "4", "--no-cuda"]


def run_main(capsys, argv, dataset="MELD"):
    """The entry point in-process (MELD: short dialogues, fast); returns (exit status, stdout, stderr)."""
    return run_entry(capsys, dataset, DEFAULTS[dataset], argv)


# ------------------------------------------------------------------ the step
@pytest.fixture(scope="module")
def small_batch(meld_dir):
    data = load_conversations("MELD", meld_dir)
    batch = next(iter(make_loaders(data, 3, shuffle_train=False)["train"]))
    return data, batch


def _in_dtype(batch, dtype):
    return dataclasses.replace(batch, **{f: getattr(batch, f).to(dtype) for f in ("text", "audio", "visual", "qmask",
                                                                                "umask")})


def _step_grads(data, batch, settings, seed=0, modulation_on=True, dtype=torch.float32, **model_flags):
    """One DGS step of a fresh model (its float32 weights, computing in `dtype`); returns the
    model (the step's gradients in .grad), the step's stats, its autograd calls, the lanes of
    each CPU GRU backward, and the (g_mm, g_uni, coeff) it shaped (None if it shaped nothing)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(data.n_classes, data.n_speakers, data.dims["audio"], data.dims["visual"], dropout=0.0,
                      **model_flags)
    model = M3Net(cfg).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)    # lr 0: the step leaves the gradients to inspect
    step = DGSStep(model, opt, torch.nn.NLLLoss(), settings)
    calls, gru_lanes, shaped = [], [], []
    real_grad, real_gru_backward, real_shape_groups = torch.autograd.grad, rnn._stack_backward, dgs.shape_groups

    def counting_grad(*a, **k):
        calls.append(1)
        return real_grad(*a, **k)

    def counting_gru_backward(plan, saved, grad_output):
        gru_lanes.append(grad_output.shape[2])
        return real_gru_backward(plan, saved, grad_output)

    def recording_shape_groups(g_mm, g_uni, coeff, *args):
        shaped.append(([[g.clone() for g in group] for group in g_mm],
                       None if g_uni is None else [[g.clone() for g in group] for group in g_uni], coeff))
        return real_shape_groups(g_mm, g_uni, coeff, *args)

    torch.autograd.grad, rnn._stack_backward, dgs.shape_groups = counting_grad, counting_gru_backward, \
        recording_shape_groups
    try:
        stats = step(_in_dtype(batch, dtype), modulation_on=modulation_on)
    finally:
        torch.autograd.grad, rnn._stack_backward, dgs.shape_groups = real_grad, real_gru_backward, real_shape_groups
    return model, stats, len(calls), gru_lanes, shaped[0] if shaped else None


def _reference_grads(model, batch):
    out = model(batch)
    labels = utterance_labels(batch, out)
    loss_mm = torch.nn.NLLLoss()(out.log_probs, labels)
    loss_uni = sum(unimodal_losses(out.unimodal_logits, labels).values())
    params = list(model.parameters())
    g_mm = torch.autograd.grad(loss_mm, params, retain_graph=True, allow_unused=True)
    g_u = torch.autograd.grad(loss_uni, params, allow_unused=True)
    return out, labels, dict(zip(map(id, params), g_mm)), dict(zip(map(id, params), g_u))


def _step_and_reference(data, batch, settings, modulation_on, model_flags, dtype):
    model, stats, backward_calls, gru_lanes, shaped = _step_grads(data, batch, settings, modulation_on=modulation_on,
                                                                  dtype=dtype, **model_flags)
    out, labels, g_mm, g_u = _reference_grads(model, _in_dtype(batch, dtype))
    params = list(model.parameters())
    return dict(model=model, stats=stats, calls=backward_calls, gru_lanes=gru_lanes, shaped=shaped,
                scores=modality_scores(model, out, labels),
                grad=[p.grad for p in params], g_mm=[g_mm[id(p)] for p in params], g_u=[g_u[id(p)] for p in params],
                index={id(p): i for i, p in enumerate(params)})


def _assert_step_follows_the_spec(data, batch, settings, modulation_on, model_flags):
    """The step against the spec's gradients, computed apart: in float64 end to end, where its
    numbers are known to u64 (the shaping's bound from tests/reference_shaping.py, the network's
    from the float32 run of the same computation: float64_error); and, in float32, MMPareto's
    case (the sign of each cosine, however near 0) as float64 decides it. Returns the float64 run."""
    single, double = (_step_and_reference(data, batch, settings, modulation_on, model_flags, dtype)
                      for dtype in (torch.float32, torch.float64))
    model, stats = double["model"], double["stats"]

    def assert_gradient_is(k, want):
        """The step's gradient of parameter k is the reference's `want` (g_mm or g_u) of it."""
        tolerance = float64_error(single["grad"][k], double["grad"][k]) + float64_error(single[want][k], double[want][k])
        assert_within(double["grad"][k], double[want][k], tolerance, f"parameter {k}")

    assert_within(stats["shapley"], double["scores"], float64_error(single["stats"]["shapley"], stats["shapley"])
                  + float64_error(single["scores"], double["scores"]), "shapley")
    coeff = stats.get("coeff")
    assert (coeff is None) == (not modulation_on or settings.modulation == "Normal")
    if coeff is not None:
        assert torch.equal(coeff, ogm_coefficients(stats["shapley"], settings.alpha))
    groups = model.encoder_groups()
    g_mm, g_uni, shaped_coeff = double["shaped"]
    assert shaped_coeff is coeff
    for i, m in enumerate(model.cfg.modalities):
        at = [double["index"][id(p)] for p in groups[m]]
        # The gradients the step shaped are the spec's g_mm,m and g_u,m...
        for j, k in enumerate(at):
            for which, name in enumerate(("g_mm", "g_u")):
                got32, got64 = (run["shaped"][which][i][j] for run in (single, double))
                want32, want64 = (torch.zeros_like(run["grad"][k]) if run[name][k] is None else run[name][k]
                                  for run in (single, double))
                assert_within(got64, want64, float64_error(got32, got64) + float64_error(want32, want64),
                              f"{name} of {m}, tensor {j}")
        # ...and the shaped ones MMPareto's merge of them, times κ_m.
        got = torch.cat([double["grad"][k].reshape(-1) for k in at])
        want, bound, want_cos, cos_bound = shaping_reference(g_mm[i], g_uni[i], None if coeff is None else coeff[i],
                                                             None, settings.pareto_gamma, torch.float64)
        assert torch.isfinite(bound).all()
        assert_within(got, want, bound, f"shaped gradient of {m}")
        assert abs(stats["cos"][i].item() - want_cos) <= cos_bound
        # In float32 the step takes the same case of MMPareto: its inputs are within δ (relative,
        # measured) of the float64 ones, which moves a cosine by at most 2(δ_mm + δ_u), and its
        # own rounding adds the float32 bound.
        mm32, uni32 = (torch.cat([g.double().reshape(-1) for g in run[i]]) for run in single["shaped"][:2])
        mm64, uni64 = (torch.cat([g.reshape(-1) for g in run[i]]) for run in (g_mm, g_uni))
        moved = 2 * ((mm32 - mm64).norm() / mm64.norm() + (uni32 - uni64).norm() / uni64.norm()).item()
        assert abs(want_cos) > moved + cosine_reference(single["shaped"][0][i], single["shaped"][1][i])[1]
        assert (single["stats"]["cos"][i].item() > 0) == (want_cos > 0)
        assert_gradient_is(double["index"][id(getattr(model, f"head_{m}").weight)], "g_u")
    fusion = double["index"][id(model.smax_fc.weight)]
    assert_gradient_is(fusion, "g_mm")
    assert double["g_u"][fusion] is None
    return double


@pytest.mark.parametrize("model_flags,cpu_grus", [({}, 1), ({"av_using_lstm": True}, 3), ({"base_model": "LSTM"}, 0)])
def test_dgs_step_gradients_follow_the_spec(small_batch, model_flags, cpu_grus):
    data, batch = small_batch
    double = _assert_step_follows_the_spec(data, batch, DGSSettings(modulation="OGM", pareto_gamma=0.5), True,
                                           model_flags)
    # Two passes: ∂ΣL_m, and ∂L_mm in two calls split at the encoder outputs; each CPU GRU's
    # backward runs once, for both cotangents (the LSTM is nn.LSTM's, in both passes).
    assert double["calls"] == 3 and double["gru_lanes"] == [2] * cpu_grus


def test_outside_the_modulation_epochs_ogm_ge_leaves_the_mmpareto_gradients(small_batch):
    # OGM (README step 6) runs in epochs modulation_starts..ends only: no κ then, and no noise.
    data, batch = small_batch
    double = _assert_step_follows_the_spec(data, batch, DGSSettings(modulation="OGM_GE", pareto_gamma=0.5), False, {})
    assert "coeff" not in double["stats"] and double["stats"]["shapley"].shape == (3,)


def test_coalitions_in_chunks_give_the_same_scores_as_one_pass(small_batch, monkeypatch):
    # Other batch shapes, other roundings: compared in float64, within float64_error.
    data, batch = small_batch
    scores = {}
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)
        model = M3Net(ModelConfig(data.n_classes, data.n_speakers, data.dims["audio"], data.dims["visual"]))
        model = model.to(dtype).eval()
        with torch.no_grad():
            out = model(_in_dtype(batch, dtype))
        labels = utterance_labels(batch, out)
        for per_pass in (1, 2, 3, 8):
            list_bytes = out.projected.numel() * out.projected.element_size()
            monkeypatch.setitem(m3net.PASS_BYTES, "cpu", per_pass * list_bytes + list_bytes // 2)
            assert m3net.coalitions_per_pass(8, out.projected) == per_pass
            scores[dtype, per_pass] = modality_scores(model, out, labels)
    for per_pass in (1, 2, 3):
        tolerance = sum(float64_error(scores[torch.float32, k], scores[torch.float64, k]) for k in (per_pass, 8))
        assert_within(scores[torch.float64, per_pass], scores[torch.float64, 8], tolerance, f"{per_pass} per pass")
    assert scores[torch.float64, 8].shape == (3,)


def test_coalitions_per_pass_keep_a_pass_within_its_bytes():
    iemocap, meld = torch.empty(440, 3, 512), torch.empty(100, 3, 512)          # 2.7 MB and 0.6 MB node lists
    assert m3net.coalitions_per_pass(8, iemocap) == 2 and m3net.coalitions_per_pass(8, meld) == 8
    assert m3net.coalitions_per_pass(8, torch.empty(1200, 3, 512)) == 1           # one over the budget: still one
    assert m3net.coalitions_per_pass(8, torch.empty(1200, 3, 512, device="meta")) == 8   # no budget: all at once


def test_plain_step_is_one_backward_of_the_summed_loss(small_batch):
    data, batch = small_batch
    runs = []
    for dtype in (torch.float32, torch.float64):          # float64: the check; float32: its rounding's size
        model, stats, backward_calls, gru_lanes, shaped = _step_grads(
            data, batch, DGSSettings(pareto=False, shapley=False, modulation="Normal"), dtype=dtype)
        assert backward_calls == 1 and gru_lanes == [1] and shaped is None
        assert "shapley" not in stats and "cos" not in stats
        _, _, g_mm, g_u = _reference_grads(model, _in_dtype(batch, dtype))
        w = model.linear_a.weight
        runs.append((w.grad, g_mm[id(w)] + g_u[id(w)]))
    (got32, want32), (got64, want64) = runs
    assert_within(got64, want64, float64_error(got32, got64) + float64_error(want32, want64))


def test_epoch_stats_by_hand():
    stats = EpochStats()
    # Binary fractions: the sums are exact, a mean's one rounding is the division's.
    for loss, cos in ((1.0, [0.5, -0.25]), (3.0, [-0.125, -0.375]), (2.0, [0.25, 0.125])):
        stats.add({"loss_mm": torch.tensor(loss), "loss_uni": torch.tensor([loss, 2 * loss]),
                   "cos": torch.tensor(cos), "log_probs": torch.zeros(2, 3)})
    means = stats.means()
    assert set(means) == {"loss_mm", "loss_uni", "cos", "conflict"}
    assert means["loss_mm"] == 2.0 and means["loss_uni"].tolist() == [2.0, 4.0]
    assert means["cos"].tolist() == pytest.approx([0.625 / 3, -0.5 / 3], rel=rounded(1))
    assert means["conflict"].tolist() == pytest.approx([1 / 3, 2 / 3], rel=rounded(1))
    assert stats.first_bad_step() is None
    stats.add({"loss_mm": torch.tensor(1.0), "loss_uni": torch.tensor([float("inf"), 0.0])})
    stats.add({"loss_mm": torch.tensor(float("nan")), "loss_uni": torch.tensor([0.0, 0.0])})
    assert stats.first_bad_step() == 3                    # a unimodal loss counts too


# ------------------------------------------------------------------ full runs
def test_training_run_writes_every_output(capsys, tmp_path, iemocap_dir):
    log = tmp_path / "run"
    status, out, err = run_main(capsys, ["--data-dir", str(iemocap_dir), "--log-dir", str(log), *FAST, "--epochs", "2"],
                                dataset="IEMOCAP")
    assert status == 0, err
    assert "epoch 1/2" in out and "epoch 2/2" in out and "selected epoch" in out
    for name in ("train.log", "metrics.jsonl", "best.pt", "last.pt", "summary.json"):
        assert (log / name).is_file(), name
    assert not list(log.glob(".*tmp"))
    records = [json.loads(line) for line in (log / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    r = records[0]
    assert set(r) >= {"epoch", "train", "test", "modalities", "lr", "epoch_time_s"}
    assert set(r["test"]) == {"loss", "acc", "weighted_f1", "macro_f1", "micro_f1",
                              "unimodal", "coalition_acc", "shapley", "per_class_f1"}
    assert set(r["test"]["unimodal"]) == set(r["test"]["shapley"]) == {"l", "a", "v"}
    assert len(r["test"]["coalition_acc"]) == 8 and len(r["test"]["per_class_f1"]) == 6
    assert set(r["modalities"]) == {"l", "a", "v"}
    assert set(r["modalities"]["a"]) == {"loss", "shapley", "coeff", "cos", "conflict_frac"}
    assert 0.0 <= r["modalities"]["a"]["conflict_frac"] <= 1.0
    assert 0.0 < r["modalities"]["l"]["coeff"] <= 1.0
    summary = json.loads((log / "summary.json").read_text())
    assert "reference protocol" in summary["selected_by"]
    assert len(summary["test_confusion_matrix"]) == 6
    assert "selected epoch" in (log / "train.log").read_text()


def test_same_seed_same_metrics_and_resume_matches(capsys, tmp_path, meld_dir):
    common = ["--data-dir", str(meld_dir), *FAST, "--valid", "0.25"]
    assert run_main(capsys, [*common, "--log-dir", str(tmp_path / "a")])[0] == 0
    assert run_main(capsys, [*common, "--log-dir", str(tmp_path / "b")])[0] == 0
    assert run_main(capsys, [*common, "--log-dir", str(tmp_path / "c"), "--epochs", "1"])[0] == 0
    status, out, err = run_main(capsys, ["--resume", "--log-dir", str(tmp_path / "c"), "--epochs", "2"])
    assert status == 0, err
    assert "resumed" in out

    def metrics(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "epoch_time_s"} for line in lines]

    assert metrics("a") == metrics("b")
    assert metrics("a") == metrics("c")
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert "validation" in summary["selected_by"]
    assert "valid" in metrics("a")[0]


def test_testing_mode_reproduces_the_checkpoint_predictions(capsys, tmp_path, meld_dir):
    train_dir, test_dir = tmp_path / "train", tmp_path / "test"
    assert run_main(capsys, ["--data-dir", str(meld_dir), "--log-dir", str(train_dir), *FAST, "--epochs", "1"])[0] == 0
    status, out, err = run_main(capsys, ["--testing", "--checkpoint", str(train_dir / "best.pt"),
                                         "--data-dir", str(meld_dir), "--log-dir", str(test_dir), *FAST])
    assert status == 0, err
    result = json.loads((test_dir / "test_metrics.json").read_text())
    assert set(result) == {"loss", "acc", "weighted_f1", "macro_f1", "micro_f1", "n_utterances", "predictions",
                           "unimodal", "coalition_acc", "shapley", "per_class_f1"}
    data = load_conversations("MELD", meld_dir)
    assert result["n_utterances"] == len(result["predictions"]) == data.utterances("test")
    record = json.loads((train_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert result["weighted_f1"] == record["test"]["weighted_f1"]   # the same predictions; JSON keeps a float exactly
    assert result["loss"] == record["test"]["loss"]
    assert f"weighted F1 {result['weighted_f1']:.2f}" in out
    first = f"MELD: test {len(data.splits['test'])} dialogues (from {meld_dir.resolve()}); on cpu; log dir {test_dir}"
    assert out.splitlines()[0] == (test_dir / "train.log").read_text().splitlines()[0] == first
    assert out.splitlines()[1].startswith("loaded ")


def test_raw_state_dict_with_m3net_extra_keys_is_tested(capsys, tmp_path, meld_dir):
    data = load_conversations("MELD", meld_dir)
    model = M3Net(ModelConfig(7, 9, data.dims["audio"], data.dims["visual"]))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head_")}
    state["graph_model.hyperconv1.weight"] = torch.zeros(512, 512)
    state["hidfc.weight"] = torch.zeros(7, 512)
    torch.save(state, tmp_path / "best_model.pth.tar")
    status, out, err = run_main(capsys, ["--testing", "--checkpoint", str(tmp_path / "best_model.pth.tar"),
                                         "--data-dir", str(meld_dir), "--log-dir", str(tmp_path / "t"), *FAST])
    assert status == 0, err
    assert "initialised head_l.weight" in out
    assert ("; a raw state_dict does not tell --use_speaker --no-use_modal --norm BN --text_linear from other values of these flags: "
            "they must be those it was trained with") in out


@pytest.mark.parametrize("argv, message", [
    (["--modals", "xyz"], "--modals"),
    (["--modulation", "Fancy"], "invalid choice"),
    (["--valid", "1.5"], "--valid"),
    (["--testing"], "--testing needs --checkpoint"),
    (["--Dataset", "IEMOCAP"], "train_OGM_Shapley_MMPareto_IEMOCAP.py"),
    (["--resume"], "last.pt does not exist"),
    (["--data-dir", "/nonexistent/dir"], "synthetic"),
    (["--checkpoint", "/nonexistent/ckpt.pt"], "no such file"),
    (["--lr", "-1"], "--lr -1.0"),
    (["--l2", "-0.1"], "--l2 -0.1"),
    (["--seed", "-1"], "--seed -1"),
    (["--seed", str(2**32)], "[0, 2^32)"),
    (["--num-workers", "-1"], "--num-workers -1"),
    (["--modulation_starts", "10", "--modulation_ends", "5"], "OGM would never run"),
    (["--pareto-gamma", "nan"], "--pareto-gamma nan: give a non-negative number"),
    (["--alpha_", "-1"], "--alpha_ -1.0: give a non-negative number"),
    (["--lr_decay_ratio", "inf"], "--lr_decay_ratio inf: give a non-negative number"),
    (["--dropout", "1"], "--dropout 1.0: give a probability in [0, 1)"),
])
def test_user_errors_are_one_line_and_exit_2(capsys, tmp_path, meld_dir, argv, message):
    if "--data-dir" not in argv:
        argv = [*argv, "--data-dir", str(meld_dir)]
    status, out, err = run_main(capsys, [*argv, "--log-dir", str(tmp_path / "x"), *FAST])
    assert status == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    assert not (tmp_path / "x").exists()          # a failed start writes nothing


def test_log_dir_that_is_a_file_is_a_user_error(capsys, tmp_path, meld_dir):
    (tmp_path / "afile").write_text("")
    status, _, err = run_main(capsys, ["--data-dir", str(meld_dir), "--log-dir", str(tmp_path / "afile"), *FAST])
    assert status == 2
    assert err.strip() == f"error: --log-dir {tmp_path / 'afile'}: exists and is not a folder"


def test_default_log_dirs_of_runs_started_together_differ(tmp_path):
    base = tmp_path / "runs" / "MELD-20261127-120000"
    first, second = RunLog(base, fresh=True), RunLog(base, fresh=True)
    assert first.dir == base and second.dir == base.with_name(base.name + "-2")
    first.close(), second.close()


def test_batches_too_large_for_the_weight_tables_fail_before_training(capsys, tmp_path, meld_dir, monkeypatch):
    data = load_conversations("MELD", meld_dir)
    longest = sorted(len(d) for d in data.splits["train"])[-4:]
    needed = sum(longest) + 3 * 4                 # hyperedges: one per utterance, one per modality per dialogue
    monkeypatch.setattr(graph, "HYPEREDGE_CAPACITY", needed - 1)
    status, out, err = run_main(capsys, ["--data-dir", str(meld_dir), "--log-dir", str(tmp_path / "x"), *FAST])
    assert status == 2
    assert err.strip() == (f"error: --batch-size 4: a shuffled train batch of 4 dialogues ({sum(longest)} utterances) "
                           f"needs {needed} hyperedges and {3 * sum(longest)} nodes, but M3Net's weight tables hold "
                           f"{needed - 1} and {graph.NODE_CAPACITY}: use a smaller --batch-size; the largest that "
                           f"fits this data is --batch-size 3")
    assert "epoch" not in out and not (tmp_path / "x").exists()


def test_batch_size_hint_when_one_dialogue_is_too_long(capsys, tmp_path, meld_dir, monkeypatch):
    data = load_conversations("MELD", meld_dir)
    longest = max(len(d) for d in data.splits["train"])
    monkeypatch.setattr(graph, "HYPEREDGE_CAPACITY", longest + 3 - 1)    # its utterances + 3 modalities, less one
    status, out, err = run_main(capsys, ["--data-dir", str(meld_dir), "--log-dir", str(tmp_path / "x"), *FAST])
    assert status == 2
    assert err.strip().endswith("use a smaller --batch-size; no batch size fits: one dialogue alone is too long")
    assert not (tmp_path / "x").exists()


def _own_checkpoint(meld_dir, path, **saved_flags):
    """A checkpoint in this project's format whose saved flags differ from the MELD defaults."""
    data = load_conversations("MELD", meld_dir)
    model = M3Net(ModelConfig(7, 9, data.dims["audio"], data.dims["visual"]))
    args = vars(entry.parse_args("MELD", DEFAULTS["MELD"], []))
    torch.save({"model": model.state_dict(), "args": {**args, **saved_flags}}, path)


def test_checkpoint_trained_with_other_architecture_flags_is_refused(capsys, tmp_path, meld_dir):
    # --norm and --use_modal leave the state_dict's keys as they are: only the saved flags tell.
    _own_checkpoint(meld_dir, tmp_path / "best.pt", norm="LN", use_modal=True)
    argv = ["--testing", "--checkpoint", str(tmp_path / "best.pt"), "--data-dir", str(meld_dir), *FAST]
    status, _, err = run_main(capsys, [*argv, "--log-dir", str(tmp_path / "t1")])
    assert status == 2
    assert err.strip() == (f"error: checkpoint {tmp_path / 'best.pt'} was trained with --norm LN --use_modal, "
                           f"this run has --norm BN --no-use_modal: give the checkpoint's flags")
    assert not (tmp_path / "t1").exists()
    status, _, err = run_main(capsys, [*argv, "--norm", "LN", "--use_modal", "--log-dir", str(tmp_path / "t2")])
    assert status == 0, err


def test_resume_needs_a_last_pt_of_this_project(capsys, tmp_path, meld_dir):
    (tmp_path / "run").mkdir()
    torch.save({"model": {}}, tmp_path / "run" / "last.pt")
    status, _, err = run_main(capsys, ["--resume", "--log-dir", str(tmp_path / "run"), "--data-dir", str(meld_dir)])
    assert status == 2
    assert err.strip() == f"error: --resume: {tmp_path / 'run' / 'last.pt'} is not a last.pt written by this project's training"


def test_resume_without_the_starting_checkpoint_and_after_a_lost_epoch(capsys, tmp_path, meld_dir):
    _own_checkpoint(meld_dir, tmp_path / "start.pt")
    log = tmp_path / "run"
    common = ["--data-dir", str(meld_dir), "--log-dir", str(log), *FAST]
    assert run_main(capsys, [*common, "--checkpoint", str(tmp_path / "start.pt"), "--epochs", "1"])[0] == 0
    (tmp_path / "start.pt").unlink()              # the run's own last.pt is all a resume needs
    with open(log / "metrics.jsonl", "a") as f:   # an epoch logged, then a crash before its last.pt
        f.write('{"epoch": 1, "lost": true}\n')
    # Flags left out keep their saved values, not the script defaults (epochs 2, CUDA allowed).
    argv = ["--resume", "--log-dir", str(log)]
    saved, _ = entry.resume_point(entry.parse_args("MELD", DEFAULTS["MELD"], argv),
                                  entry.given_flags("MELD", DEFAULTS["MELD"], argv))
    assert (saved.epochs, saved.no_cuda, saved.batch_size, saved.checkpoint) == (1, True, 4, None)
    status, _, err = run_main(capsys, [*argv, "--lr", "0.5"])
    assert status == 2
    assert ("changes --lr (0.0001 -> 0.5): only --epochs, --no-cuda, --no-cuda-graphs, --num-workers, --data-dir "
            "may change") in err
    status, out, err = run_main(capsys, [*common, "--resume", "--epochs", "2"])   # the same flags again
    assert status == 0, err
    assert f"resumed from {log / 'last.pt'} after epoch 1/2 (epoch 0 in metrics.jsonl)" in out
    records = [json.loads(line) for line in (log / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and "lost" not in records[1]
    # A run saved before a flag existed: the flag takes this command line's value.
    state = torch.load(log / "last.pt", weights_only=False)
    del state["args"]["tensorboard"]
    torch.save(state, log / "last.pt")
    saved, _ = entry.resume_point(entry.parse_args("MELD", DEFAULTS["MELD"], [*argv, "--tensorboard"]),
                                  entry.given_flags("MELD", DEFAULTS["MELD"], [*argv, "--tensorboard"]))
    assert (saved.tensorboard, saved.epochs, saved.batch_size) == (True, 2, 4)


def test_given_flags_are_those_on_the_command_line_whatever_their_values():
    def given(*argv: str) -> set[str]:
        return entry.given_flags("MELD", DEFAULTS["MELD"], list(argv))

    assert given() == set()
    # A value equal to the default still counts; abbreviations, --x=v and --no-x are flags too.
    assert given("--lr", "0.0001", "--epo=3", "--no-class-weight", "--resume") == {"lr", "epochs", "class_weight",
                                                                                 "resume"}
    assert given("--seed", "0", "--Dataset", "MELD", "--no-cuda") == {"seed", "Dataset", "no_cuda"}


def test_logged_flags_are_a_command_line_that_gives_the_same_flags(capsys, tmp_path, meld_dir):
    log = tmp_path / "flags"
    argv = ["--data-dir", str(meld_dir), "--log-dir", str(log), *FAST, "--epochs", "1", "--no-use_speaker",
            "--modals", "al", "--tensorboard", "--norm", "LN 2"]
    status, out, err = run_main(capsys, argv[:-3])
    assert status == 0, err
    logged = next(line for line in out.splitlines() if line.startswith("flags: "))[len("flags: "):]
    assert "--no-cuda " in logged and "--no-use_speaker" in logged and "--batch-size 4" in logged
    assert "--tensorboard" not in logged and "--checkpoint" not in logged            # off, and None
    assert entry.parse_args("MELD", {}, shlex.split(logged)) == entry.parse_args("MELD", DEFAULTS["MELD"], argv[:-3])
    # A value with a space is quoted.
    args = entry.parse_args("MELD", DEFAULTS["MELD"], argv)
    assert entry.parse_args("MELD", {}, shlex.split(as_command_line(args))) == args


def test_evaluation_loss_is_the_weighted_loss_of_the_whole_split(iemocap_dir):
    data = load_conversations("IEMOCAP", iemocap_dir)
    loaders = make_loaders(data, 2, shuffle_train=False)
    torch.manual_seed(0)
    model = M3Net(ModelConfig(data.n_classes, data.n_speakers, data.dims["audio"], data.dims["visual"])).eval()
    weights = torch.tensor([1.0, 3.0, 0.5, 2.0, 0.0, 1.5])
    outputs = []                                       # the log-probs evaluate computed, batch by batch
    model.register_forward_hook(lambda module, inputs, out: outputs.append(out.log_probs))
    result = evaluate(model, loaders["test"], torch.nn.NLLLoss(weight=weights), torch.device("cpu"), "IEMOCAP")
    numerator = denominator = 0.0
    for batch, log_probs in zip(loaders["test"], outputs, strict=True):
        y = batch.labels[batch.umask.bool()]
        numerator += float((weights[y] * -log_probs.gather(1, y[:, None]).squeeze(1)).sum())
        denominator += float(weights[y].sum())
    assert len(loaders["test"]) > 1
    # The same N nonnegative terms w_y (−log p_y) summed two ways: either sum of them and of the
    # weights is within γ_N of the exact one (relative: no term is negative), each product and
    # the division one rounding.
    n = data.utterances("test")
    assert result["loss"] == pytest.approx(numerator / denominator, rel=4 * summation_gamma(n) + rounded(3))


def test_incompatible_checkpoint_names_the_flag(capsys, tmp_path, meld_dir):
    data = load_conversations("MELD", meld_dir)
    model = M3Net(ModelConfig(7, 9, data.dims["audio"], data.dims["visual"], num_L=3))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    status, _, err = run_main(capsys, ["--testing", "--checkpoint", str(tmp_path / "m.pt"), "--data-dir",
                                       str(meld_dir), "--log-dir", str(tmp_path / "t"), *FAST])
    assert status == 2
    assert "--num_L 3" in err and "hyperconv2" in err


def test_nan_loss_stops_with_epoch_and_step_and_keeps_last_checkpoint(capsys, tmp_path, meld_dir, monkeypatch):
    real_loss = entry.multimodal_loss
    calls = []

    class NaNAfterFirstEpoch(torch.nn.Module):
        def __init__(self, inner, train_steps):
            super().__init__()
            self.inner, self.train_steps = inner, train_steps

        def forward(self, log_probs, labels):
            loss = self.inner(log_probs, labels)
            if torch.is_grad_enabled():
                calls.append(1)
                if len(calls) == self.train_steps + 2:      # epoch 1, step 1
                    return loss * float("nan")
            return loss

    data = load_conversations("MELD", meld_dir)
    steps = -(-len(data.splits["train"]) // 4)
    monkeypatch.setattr(entry, "multimodal_loss", lambda *a: NaNAfterFirstEpoch(real_loss(*a), steps))
    log = tmp_path / "nan"
    status, out, err = run_main(capsys, ["--data-dir", str(meld_dir), "--log-dir", str(log), *FAST, "--epochs", "3"])
    assert status == 1
    assert f"at epoch 2/3 (epoch 1 in metrics.jsonl), step 2/{steps};" in err
    assert torch.load(log / "last.pt", weights_only=True)["epoch"] == 0
    assert (log / "train.log").read_text().splitlines()[-1] == err.strip()      # the log says how the run ended


def test_nan_loss_in_the_first_epoch_says_nothing_was_saved(capsys, tmp_path, meld_dir, monkeypatch):
    class NaNLoss(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, log_probs, labels):
            loss = self.inner(log_probs, labels)
            return loss * float("nan") if torch.is_grad_enabled() else loss

    real_loss = entry.multimodal_loss
    monkeypatch.setattr(entry, "multimodal_loss", lambda *a: NaNLoss(real_loss(*a)))
    log = tmp_path / "nan"
    status, _, err = run_main(capsys, ["--data-dir", str(meld_dir), "--log-dir", str(log), *FAST, "--epochs", "2"])
    assert status == 1
    assert err.startswith("error: the loss became NaN/Inf at epoch 1/2 (epoch 0 in metrics.jsonl), step 1/")
    assert err.endswith(f"; nothing was saved before it; remove {log} before reusing it\n")
    assert not (log / "last.pt").exists()


def test_seed_readme_command_runs_from_inside_run(tmp_path, meld_dir):
    """The seed README's MELD command (one epoch), run from inside run/ with the data in the current directory."""
    run_dir = tmp_path / "repo" / "run"
    run_dir.mkdir(parents=True)
    script = run_dir / "train_OGM_Shapley_MMPareto_MELD.py"
    script.write_text((REPO / "run" / script.name).read_text().replace(
        "Path(__file__).resolve().parents[1]", repr(str(REPO))))
    (run_dir / "MELD_features").symlink_to(Path(meld_dir) / "MELD_features")
    cmd = [sys.executable, "-u", script.name, "--base-model", "GRU", "--dropout", "0.4", "--lr", "0.00001",
           "--batch-size", "8", "--graph_type=hyper", "--use_topic", "--epochs=1", "--graph_construct=direct",
           "--multi_modal", "--use_modal", "--mm_fusion_mthd=concat_DHT", "--modals=avl", "--Dataset=MELD",
           "--norm", "BN", "--num_L=1", "--num_K=1", "--modulation_ends=50", "--alpha_=0.6"]
    done = subprocess.run(cmd, cwd=run_dir, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "epoch 1/1" in done.stdout
    assert len(list((run_dir / "runs").glob("MELD-*/summary.json"))) == 1


def test_a_run_stopped_in_its_first_epoch_leaves_a_folder_new_runs_refuse(capsys, tmp_path, meld_dir, monkeypatch):
    def stopped(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(entry.Trainer, "fit", stopped)
    log = tmp_path / "killed"
    argv = ["--data-dir", str(meld_dir), "--log-dir", str(log), *FAST]
    status, _, err = run_main(capsys, argv)
    assert (status, err) == (130, f"interrupted in the first epoch: nothing saved to continue from; remove {log} "
                                  f"before reusing it\n")
    assert sorted(p.name for p in log.iterdir()) == [".lock", "metrics.jsonl", "train.log"]
    assert (log / "train.log").read_text().splitlines()[-1] == err.strip()
    monkeypatch.undo()
    status, _, err = run_main(capsys, argv)
    assert status == 2 and "holds a run that stopped before it saved its first last.pt" in err


def test_interrupted_and_finished_runs_say_how_to_go_on(capsys, tmp_path, meld_dir, monkeypatch):
    log = tmp_path / "done"
    argv = ["--data-dir", str(meld_dir), "--log-dir", str(log), *FAST]
    assert run_main(capsys, [*argv, "--epochs", "1"])[0] == 0
    with monkeypatch.context() as patch:
        patch.setattr(entry.Trainer, "fit", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
        status, _, err = run_main(capsys, [*argv, "--resume", "--epochs", "3"])
    assert (status, err) == (130, f"interrupted ({log / 'last.pt'} keeps the last finished epoch: continue it with "
                                  f"--resume --log-dir {log})\n")
    assert (log / "train.log").read_text().splitlines()[-1] == err.strip()
    status, _, err = run_main(capsys, [*argv, "--resume"])              # its saved --epochs 1: no more to do
    assert (status, err) == (2, f"error: --resume: the run in {log} has finished 1 of its 1 epochs, and --epochs "
                                f"1 asks for no more: give --epochs above 1 to continue it\n")


@pytest.mark.parametrize("blocked", [".lock", "train.log"])
def test_a_log_dir_that_cannot_be_written_is_one_line(capsys, tmp_path, meld_dir, blocked):
    log = tmp_path / "blocked"
    (log / blocked).mkdir(parents=True)          # unwritable even for root, unlike a chmod
    status, out, err = run_main(capsys, ["--data-dir", str(meld_dir), "--log-dir", str(log), *FAST])
    assert status == 2 and out == ""
    assert re.fullmatch(rf"error: --log-dir {re.escape(str(log))}: cannot write in it \(Is a directory\)\n", err)
    assert [p.name for p in log.iterdir()] == [blocked]                 # nothing else written


def test_a_closed_stdout_does_not_stop_the_run(tmp_path, meld_dir):
    """`python ... | head -1`: the run goes on into train.log, and ends cleanly."""
    log = tmp_path / "piped"
    cmd = [sys.executable, "-u", str(REPO / "run" / "train_OGM_Shapley_MMPareto_MELD.py"), "--data-dir", str(meld_dir),
           "--log-dir", str(log), "--epochs", "2", *FAST]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as run:
        first = run.stdout.readline()
        run.stdout.close()                       # the reader goes away
        stderr = run.stderr.read()
    assert first.startswith("MELD: train ")
    assert run.returncode == 0, stderr
    assert stderr == ""
    text = (log / "train.log").read_text()
    assert "epoch 2/2" in text and "selected epoch" in text
    assert [json.loads(line)["epoch"] for line in (log / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_runs_save_their_data_dir_absolute_and_resume_only_with_their_script(capsys, tmp_path, meld_dir,
                                                                              monkeypatch):
    monkeypatch.chdir(meld_dir.parent)
    log = tmp_path / "rel"
    status, out, _ = run_main(capsys, ["--data-dir", meld_dir.name, "--log-dir", str(log), *FAST, "--epochs", "1"])
    assert status == 0 and f"(from {meld_dir.resolve()}); on cpu" in out
    assert torch.load(log / "last.pt", weights_only=False)["args"]["data_dir"] == str(meld_dir.resolve())
    monkeypatch.chdir(tmp_path)                        # resumed from elsewhere: the saved path still holds
    assert run_main(capsys, ["--resume", "--log-dir", str(log), "--epochs", "2"])[0] == 0
    status, _, err = run_main(capsys, ["--resume", "--log-dir", str(log), "--epochs", "3"], dataset="IEMOCAP")
    assert (status, err) == (2, f"error: --resume: {log / 'last.pt'} is a MELD run: continue it with "
                                f"run/train_OGM_Shapley_MMPareto_MELD.py\n")


def test_a_checkpoint_that_cannot_be_written_is_one_line(capsys, tmp_path, meld_dir):
    log = tmp_path / "full"
    (log / ".last.pt.tmp").mkdir(parents=True)         # stands in for a full disk or a read-only folder
    status, _, err = run_main(capsys, ["--data-dir", str(meld_dir), "--log-dir", str(log), *FAST, "--epochs", "1"])
    assert (status, err) == (2, f"error: cannot write the checkpoint of epoch 1/1: {log / '.last.pt.tmp'} "
                                f"(Is a directory)\n")
    assert (log / "train.log").read_text().splitlines()[-1] == err.strip()


def test_a_log_dir_whose_metrics_file_is_a_folder_is_refused(capsys, tmp_path, meld_dir):
    log = tmp_path / "odd"
    (log / "metrics.jsonl").mkdir(parents=True)
    status, out, err = run_main(capsys, ["--data-dir", str(meld_dir), "--log-dir", str(log), *FAST])
    assert (status, out, err) == (2, "", f"error: --log-dir {log}: its metrics.jsonl is not a file; remove it or "
                                         f"pick another folder\n")


def test_new_run_refuses_a_log_dir_holding_a_run(capsys, tmp_path, meld_dir):
    log = tmp_path / "old"
    log.mkdir()
    (log / "metrics.jsonl").write_text('{"epoch": 0}\n')
    # Killed before its first last.pt: neither a new run nor --resume can use the folder, and both say so.
    nothing = (f"error: --log-dir {log} holds a run that stopped before it saved its first last.pt: there is "
               f"nothing to resume; remove that folder or pick another")
    for extra in ([], ["--resume"]):
        status, _, err = run_main(capsys, ["--data-dir", str(meld_dir), "--log-dir", str(log), *FAST, *extra])
        assert (status, err.strip()) == (2, nothing)
    (log / "last.pt").write_bytes(b"")
    status, _, err = run_main(capsys, ["--data-dir", str(meld_dir), "--log-dir", str(log), *FAST])
    assert status == 2
    assert "already holds a run" in err and "--resume" in err
    assert (log / "metrics.jsonl").read_text() == '{"epoch": 0}\n'


def test_a_log_dir_in_use_by_a_running_run_is_refused(capsys, tmp_path, meld_dir):
    running = RunLog(tmp_path / "busy")
    status, _, err = run_main(capsys, ["--data-dir", str(meld_dir), "--log-dir", str(tmp_path / "busy"), *FAST,
                                       "--epochs", "1"])
    assert (status, err.strip()) == (2, f"error: --log-dir {tmp_path / 'busy'} is in use by another run that is "
                                        f"still going: wait for it to end, or pick another folder")
    assert not (tmp_path / "busy" / "metrics.jsonl").exists()
    # A live run in its first epoch (metrics.jsonl, no last.pt yet): still in use, not a stopped run.
    (tmp_path / "busy" / "metrics.jsonl").touch()
    for extra in ([], ["--resume"]):
        status, _, err = run_main(capsys, ["--data-dir", str(meld_dir), "--log-dir", str(tmp_path / "busy"), *FAST,
                                           *extra])
        assert status == 2 and "is in use by another run that is still going" in err
    running.close()
    RunLog(tmp_path / "busy").close()             # free again once the first one ends


def test_checkpoint_of_the_other_dataset_names_its_script(capsys, tmp_path, meld_dir):
    _own_checkpoint(meld_dir, tmp_path / "best.pt", Dataset="IEMOCAP")
    status, _, err = run_main(capsys, ["--testing", "--checkpoint", str(tmp_path / "best.pt"), "--data-dir",
                                       str(meld_dir), "--log-dir", str(tmp_path / "t"), *FAST])
    assert (status, err.strip()) == (2, f"error: checkpoint {tmp_path / 'best.pt'} was trained on IEMOCAP: use "
                                        f"run/train_OGM_Shapley_MMPareto_IEMOCAP.py with IEMOCAP data")
    # A raw M3Net state_dict has no flags: its classifier's 6 classes are IEMOCAP's.
    data = load_conversations("MELD", meld_dir)
    raw = M3Net(ModelConfig(6, 2, data.dims["audio"], data.dims["visual"])).state_dict()
    torch.save({k: v for k, v in raw.items() if not k.startswith("head_")}, tmp_path / "raw.pt")
    status, _, err = run_main(capsys, ["--testing", "--checkpoint", str(tmp_path / "raw.pt"), "--data-dir",
                                       str(meld_dir), "--log-dir", str(tmp_path / "t2"), *FAST])
    assert (status, err.strip()) == (2, f"error: checkpoint {tmp_path / 'raw.pt'} has the classifier of IEMOCAP: use "
                                        f"run/train_OGM_Shapley_MMPareto_IEMOCAP.py with IEMOCAP data")


def test_ctrl_c_is_one_line_and_exit_130(capsys, monkeypatch):
    def interrupted(*_):
        raise KeyboardInterrupt
    monkeypatch.setattr(entry, "train", interrupted)
    status, _, err = run_main(capsys, [])
    assert status == 130
    assert err.startswith("interrupted (") and len(err.strip().splitlines()) == 1


def test_run_scripts_defaults_are_the_readme_settings():
    """Without flags: IEMOCAP seed 1475, --use_modal on, γ 0.2; MELD seed 67137, --use_modal off, γ 1.0."""
    sys.path.insert(0, str(REPO / "run"))
    try:
        from train_OGM_Shapley_MMPareto_IEMOCAP import IEMOCAP_DEFAULTS
        from train_OGM_Shapley_MMPareto_MELD import MELD_DEFAULTS
    finally:
        sys.path.remove(str(REPO / "run"))
    iemocap = entry.parse_args("IEMOCAP", IEMOCAP_DEFAULTS, [])
    meld = entry.parse_args("MELD", MELD_DEFAULTS, [])
    assert (iemocap.seed, iemocap.use_modal, iemocap.pareto_gamma, iemocap.epochs, iemocap.lr) == (1475, True, 0.2, 80, 1e-4)
    assert (meld.seed, meld.use_modal, meld.pareto_gamma, meld.epochs, meld.lr) == (67137, False, 1.0, 50, 1e-5)
    assert iemocap.dropout == 0.5 and meld.dropout == 0.4


def test_no_cuda_graphs_flag_reaches_the_model(meld_dir):
    data = load_conversations("MELD", meld_dir)
    for argv, graphs in (([], True), (["--no-cuda-graphs"], False)):
        assert entry.build_model(entry.parse_args("MELD", DEFAULTS["MELD"], argv), data).cuda_graphs is graphs
