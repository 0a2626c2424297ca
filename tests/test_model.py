"""M3Net forward (README: "What a training step does", step 1): shapes, embeddings, coalitions, padding, text norms, every encoder."""
from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F

from dataloader.batch import Batch
from model.graph import GraphCapacityError, build_graph
from model.m3net import M3Net, ModelConfig

try:
    from tests.reference_m3net import assert_close
    from tests.tolerance import assert_same_computation, assert_within, float64_error, summation_gamma
except ImportError:  # tests/ on sys.path instead of the repo root
    from reference_m3net import assert_close
    from tolerance import assert_same_computation, assert_within, float64_error, summation_gamma

CPU = torch.device("cpu")
C, S, DA, DV = 5, 3, 8, 6


def make_batch(lengths, seed=0, text_shift=0.0) -> Batch:
    """A collated batch as the loader lays it out: sequence-first, zeros at padding."""
    g = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths)
    umask = torch.zeros(b, t)
    for i, n in enumerate(lengths):
        umask[i, :n] = 1.0
    pad = umask.t()[..., None]                                            # [T, B, 1]
    text = (torch.randn(4, t, b, 1024, generator=g) * 2.0 + text_shift) * pad
    audio = torch.randn(t, b, DA, generator=g) * pad
    visual = torch.randn(t, b, DV, generator=g) * pad
    speakers = torch.randint(0, S, (t, b), generator=g)
    qmask = F.one_hot(speakers, S).float() * pad
    labels = torch.randint(0, C, (b, t), generator=g) * umask.long()
    return Batch(text=text, audio=audio, visual=visual, qmask=qmask, umask=umask, labels=labels,
                 lengths=torch.tensor(lengths), ids=[f"d{i}" for i in range(b)])


def in_dtype(batch: Batch, dtype: torch.dtype) -> Batch:
    return dataclasses.replace(batch, **{f: getattr(batch, f).to(dtype) for f in ("text", "audio", "visual", "qmask",
                                                                                "umask")})


def as_dtype(model: M3Net, dtype: torch.dtype) -> M3Net:
    """A copy of the model computing in `dtype` (its float32 weights, exactly)."""
    return copy.deepcopy(model).to(dtype)


def make_model(seed=0, **kw) -> M3Net:
    torch.manual_seed(seed)
    kw.setdefault("dropout", 0.0)
    return M3Net(ModelConfig(n_classes=C, n_speakers=S, audio_dim=DA, visual_dim=DV, **kw))


def randomise_graph(model: M3Net, seed=0) -> M3Net:
    g = torch.Generator().manual_seed(seed)
    gm = model.graph_model
    with torch.no_grad():
        gm.hyperedge_weight.copy_(torch.rand(gm.hyperedge_weight.shape, generator=g) * 1.8 + 0.2)
        gm.EW_weight.copy_(torch.rand(gm.EW_weight.shape, generator=g) * 1.8 + 0.2)
        for name, p in gm.named_parameters():
            if name.startswith(("hyperconv", "conv")) and name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            if name.endswith("gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def all_coalitions(n_mod: int) -> torch.Tensor:
    """[2^M, M] bool; row k has modality m present iff bit m of k is set (row 0 empty, last full)."""
    return torch.tensor([[bool(k >> m & 1) for m in range(n_mod)] for k in range(2 ** n_mod)])


# =========================================================================== shapes
@pytest.mark.parametrize("modals,use_residue", [("avl", False), ("al", True), ("v", False)])
def test_output_shapes(modals, use_residue):
    model = make_model(modals=modals, use_residue=use_residue).eval()
    batch = make_batch((3, 1, 4))
    with torch.no_grad():
        out = model(batch)
    mods = model.cfg.modalities
    assert mods == "".join(m for m in "lav" if m in modals)
    n_mod = len(mods)
    assert out.log_probs.shape == (8, C)

    def probabilities(dtype):                # they sum to 1, to the rounding of the forward
        with torch.no_grad():
            return as_dtype(model, dtype)(in_dtype(batch, dtype)).log_probs.exp().sum(-1), torch.ones(8)
    assert_same_computation(probabilities)
    assert set(out.unimodal_logits) == set(mods)
    for m in mods:
        assert out.unimodal_logits[m].shape == (8, C)
        assert out.encoded[m].shape == (4, 3, 1024)
    assert out.nodes.shape == (8, n_mod, 1024)                      # the real utterances' nodes
    assert out.graph.lengths == (3, 1, 4) and out.graph.n_modalities == n_mod
    assert model.smax_fc.in_features == n_mod * (2048 if use_residue else 1024)


def test_unimodal_logits_are_heads_of_valid_encoder_outputs():
    model = make_model().eval()
    batch = make_batch((2, 3, 1), seed=1)
    with torch.no_grad():
        out = model(batch)
        for m in "lav":
            rows = torch.stack([out.encoded[m][t, b] for b, n in enumerate((2, 3, 1)) for t in range(n)])
            head = getattr(model, f"head_{m}")
            # Both a linear map of the same rows: each a sum of 1025 terms, within γ of Σ|terms|.
            bound = 2 * summation_gamma(head.in_features + 1) * (rows.abs() @ head.weight.abs().t() + head.bias.abs())
            assert_within(out.unimodal_logits[m], head(rows), bound)
    assert batch.labels[batch.umask.bool()].tolist() == [batch.labels[b, t].item()
                                           for b, n in enumerate((2, 3, 1)) for t in range(n)]


@pytest.mark.parametrize("use_speaker,use_modal", [(True, True), (False, False)])
def test_speaker_and_modal_embeddings(use_speaker, use_modal):
    model = make_model(use_speaker=use_speaker, use_modal=use_modal).eval()
    batch = make_batch((3, 2), seed=2)
    graph = model.graph_for(batch)
    with torch.no_grad():
        encoded = model.encode(batch, graph)
        nodes = model.graph_nodes({m: graph.gather_utterances(z) for m, z in encoded.items()},
                                  batch, graph)                         # [N, M, 1024]
    spk = model.graph_model.speaker_embeddings.weight
    modal = model.graph_model.modal_embeddings.weight          # rows: a, v, l
    for b, n in enumerate((3, 2)):
        for t in range(n):
            speaker = int(batch.qmask[t, b].argmax())
            for m, mod in enumerate("lav"):
                terms = [encoded[mod][t, b]]
                if use_speaker and mod == "l":
                    terms.append(spk[speaker])
                if use_modal:
                    terms.append(modal[{"a": 0, "v": 1, "l": 2}[mod]])
                # at most 3 terms, added in either order: γ_2 of their magnitudes each way
                magnitude = sum(x.abs() for x in terms)
                assert_within(nodes[3 * b + t, m], sum(terms[1:], terms[0]), 2 * summation_gamma(2) * magnitude)


def test_capacity_error_from_forward():
    model = make_model(modals="av")
    lengths = (30,) * 40                     # 1200 utterances + 80 modality hyperedges > 1000
    batch = Batch(text=torch.zeros(4, 30, 40, 1), audio=torch.zeros(30, 40, DA),
                  visual=torch.zeros(30, 40, DV), qmask=torch.zeros(30, 40, S), umask=torch.ones(40, 30),
                  labels=torch.zeros(40, 30, dtype=torch.long), lengths=torch.tensor(lengths),
                  ids=list(range(40)))
    with pytest.raises(GraphCapacityError, match="--batch-size"):
        model(batch)


def test_graph_for_reuses_cached_graph():
    model = make_model(modals="al")
    g1 = model.graph_for(make_batch((3, 1), seed=1))
    assert model.graph_for(make_batch((3, 1), seed=2)) is g1
    assert g1.n_modalities == 2 and g1.lengths == (3, 1)


# =========================================================================== coalitions
@pytest.mark.parametrize("modals,use_residue", [("avl", True), ("al", False)])
def test_coalitions_equal_separate_fuse_with_zeroed_modalities(modals, use_residue):
    model = randomise_graph(make_model(modals=modals, use_residue=use_residue, num_L=2, num_K=2)).eval()
    batch = make_batch((3, 1, 4), seed=3)
    n_mod = len(model.cfg.modalities)
    coalitions = all_coalitions(n_mod)
    runs = {}

    @torch.no_grad()
    def coalitions_and_zeroed(dtype):
        m = as_dtype(model, dtype)
        out = m(in_dtype(batch, dtype))
        got = m.fuse(out.nodes, out.graph, coalitions, dropout=False)
        assert got.shape == (2 ** n_mod, 8, C)
        want = []
        for coalition in coalitions:
            zeroed = out.nodes.clone()
            zeroed[:, ~coalition] = 0.0
            want.append(m.fuse(zeroed, out.graph, dropout=False))
        runs[dtype] = got
        # the full coalition is the plain eval forward
        return [*got, got[-1]], [*want, out.log_probs]
    assert_same_computation(coalitions_and_zeroed)
    # the coalitions really differ from each other, beyond rounding
    got32, got64 = runs[torch.float32], runs[torch.float64]
    assert (got64[0] - got64[-1]).abs().max() > float64_error(got32[0], got64[0]) + float64_error(got32[-1], got64[-1])


def test_eval_forward_has_no_dropout_train_forward_has():
    model = make_model(dropout=0.5).eval()
    batch = make_batch((3, 2), seed=4)
    with torch.no_grad():
        a, b = model(batch).log_probs, model(batch).log_probs
        assert torch.equal(a, b)
        model.train()
        c = model(batch).log_probs
    assert not torch.allclose(a, c)


def test_the_head_drops_out_as_f_dropout_does():
    model = randomise_graph(make_model(dropout=0.4)).train()
    batch = make_batch((3, 2), seed=4)
    with torch.no_grad():
        out = model.eval()(batch)
        model.train()
        torch.manual_seed(7)
        got = model.fuse(out.nodes, out.graph)
        h = model.graph_model(out.nodes, out.graph)
        torch.manual_seed(7)
        want = F.log_softmax(model.smax_fc(F.relu(F.dropout(h, 0.4, True))), dim=-1)
    assert torch.equal(got, want)


# =========================================================================== padding
def test_nothing_at_padded_steps_reaches_a_prediction():
    """Encoder outputs at padded steps (the GRU's there are not 0) are never read downstream."""
    model = randomise_graph(make_model(num_L=2, num_K=2, use_residue=True)).eval()
    batch = make_batch((2, 5, 1), seed=5)
    encode = model.encode

    def encode_with_garbage(b, graph):
        pad = ~graph.valid.t()[..., None]                                 # [T, B, 1]
        return {m: z.masked_fill(pad, 1e4) for m, z in encode(b, graph).items()}

    with torch.no_grad():
        clean = model(batch)
        model.encode = encode_with_garbage
        dirty = model(batch)
        coalitions = all_coalitions(3)
        assert torch.equal(model.fuse(dirty.nodes, dirty.graph, coalitions, dropout=False),
                           model.fuse(clean.nodes, clean.graph, coalitions, dropout=False))
    assert not torch.equal(dirty.encoded["l"], clean.encoded["l"])
    assert torch.equal(dirty.log_probs, clean.log_probs)
    for m in "lav":
        assert torch.equal(dirty.unimodal_logits[m], clean.unimodal_logits[m])


def test_valuation_reuses_the_forward_projection_and_the_first_layers_messages():
    """fc1 runs once per step, and so do the first high-frequency layer's within-modality
    messages: the coalition passes take the forward's projection and the two-state messages."""
    model = randomise_graph(make_model(num_L=1, num_K=2, use_residue=True)).eval()
    batch = make_batch((2, 5, 1), seed=8)
    with torch.no_grad():
        out = model(batch)
        assert out.projected.shape == (8, 3, 512)                      # 2 + 5 + 1 utterances
        assert_close(out.projected, model.graph_model.fc1(out.nodes), rtol=0, atol=0)
        messages = model.graph_model.presence_messages(out.projected, out.graph)
        assert messages.shape == (2, 8, 3, 512)                        # absent, present
        conv1 = model.graph_model.conv1
        bias = model.graph_model.fc1.bias.expand_as(out.projected)
        assert torch.equal(messages[1], conv1.within_modality(torch.stack([bias, out.projected]), out.graph)[1])
        coalitions = all_coalitions(3)
        want = model.fuse(out.nodes, out.graph, coalitions, dropout=False)
        assert torch.equal(model.fuse(out.nodes, out.graph, coalitions, dropout=False, projected=out.projected,
                                      presence_messages=messages), want)

    @torch.no_grad()
    def one_pass_per_coalition(dtype):      # as chunks do: other batch sizes, other roundings
        m = as_dtype(model, dtype)
        out = m(in_dtype(batch, dtype))
        messages = m.graph_model.presence_messages(out.projected, out.graph)
        want = m.fuse(out.nodes, out.graph, coalitions, dropout=False)
        return ([m.fuse(out.nodes, out.graph, coalitions[k: k + 1], dropout=False, projected=out.projected,
                        presence_messages=messages) for k in (1, 5)], [want[1: 2], want[5: 6]])
    assert_same_computation(one_pass_per_coalition)
    assert model.graph_model.presence_messages(out.projected, out.graph) is not None
    assert randomise_graph(make_model(num_K=0)).graph_model.presence_messages(out.projected, out.graph) is None


def test_graph_stage_weights_are_positional_over_the_batch():
    """Dialogue 2 of a batch reads the weight tables at its global offsets (the reference's quirk)."""
    model = randomise_graph(make_model(modals="av", num_L=2, num_K=1)).eval()
    g = torch.Generator().manual_seed(6)
    nodes = torch.randn(5, 2, 1024, generator=g)              # lengths (3, 2), modalities a, v
    alone = nodes[3:]                                         # the second dialogue's
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        gm = shifted.graph_model
        edge_offset, node_offset = 2 + 3, 2 * 3               # d1: 2 modality + 3 utterance hyperedges, 6 nodes
        gm.hyperedge_weight.copy_(torch.roll(gm.hyperedge_weight, -edge_offset))
        gm.EW_weight.copy_(torch.roll(gm.EW_weight, -node_offset))
    # with the uniform initial tables the batch composition does not matter
    fresh = make_model(modals="av", num_L=2, num_K=1).eval()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items()
                           if k not in ("graph_model.hyperedge_weight", "graph_model.EW_weight")}, strict=False)
    runs = {}

    @torch.no_grad()
    def alone_and_in_batch(dtype):
        def fuse(m, x, lengths):
            return as_dtype(m, dtype).fuse(x.to(dtype), build_graph(lengths, 2, CPU), dropout=False)
        in_batch = runs[dtype, "in batch"] = fuse(model, nodes, (3, 2))[3:]
        runs[dtype, "plain"] = fuse(model, alone, (2,))
        return ([fuse(shifted, alone, (2,)), fuse(fresh, nodes, (3, 2))[3:]],
                [in_batch, fuse(fresh, alone, (2,))])
    assert_same_computation(alone_and_in_batch)
    # the tables' offsets do matter, beyond rounding
    tolerance = sum(float64_error(runs[torch.float32, k], runs[torch.float64, k]) for k in ("in batch", "plain"))
    assert (runs[torch.float64, "in batch"] - runs[torch.float64, "plain"]).abs().max() > tolerance


# =========================================================================== text normalisation
def _bn_manual(x, weight, bias, eps=1e-5):
    flat = x.reshape(-1, x.shape[-1])
    mean, var = flat.mean(0), flat.var(0, unbiased=False)
    return ((x - mean) / torch.sqrt(var + eps)) * weight + bias


def test_bn_uses_statistics_over_padded_positions_in_train_mode():
    model = make_model(norm="BN")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for s in "abcd":
            bn = getattr(model, f"normBN{s}")
            bn.weight.copy_(torch.rand(1024, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(1024, generator=g))
    lengths = (4, 1, 2)
    batch = make_batch(lengths, seed=7, text_shift=1.5)       # padding (zeros) is far from the mean
    valid = batch.umask.t().bool()                             # [T, B]
    # statistics of the real utterances only would give something else
    mean_valid = batch.text[0][valid].mean(0)
    mean_all = batch.text[0].reshape(-1, 1024).mean(0)
    assert (mean_valid - mean_all).abs().mean() > 0.3

    def train_then_eval(dtype):
        m, b = as_dtype(model, dtype).train(), in_dtype(batch, dtype)
        norms = [getattr(m, f"normBN{s}") for s in "abcd"]
        z = m.encode(b, m.graph_for(b))["l"]
        with torch.no_grad():
            manual = sum(_bn_manual(b.text[k], bn.weight, bn.bias) for k, bn in enumerate(norms)) / 4
            want = m.gru_l(m.linear_l(manual))[0]
            # running statistics: momentum 0.1 from (0, 1), unbiased variance over all T*B rows
            rows = b.text[0].reshape(-1, 1024)
            # eval mode uses the running statistics
            m.eval()
            z_eval = m.encode(b, m.graph_for(b))["l"]
            manual = sum(((b.text[k] - bn.running_mean) / torch.sqrt(bn.running_var + 1e-5)) * bn.weight + bn.bias
                         for k, bn in enumerate(norms)) / 4
            want_eval = m.gru_l(m.linear_l(manual))[0]
        # encoder outputs at padding are never read
        return ([z[valid], norms[0].running_mean, norms[0].running_var, z_eval[valid]],
                [want[valid], 0.1 * rows.mean(0), 0.9 + 0.1 * rows.var(0), want_eval[valid]])
    assert_same_computation(train_then_eval)


@pytest.mark.parametrize("norm", ["LN", "LN2", "none"])
def test_other_text_norms(norm):
    model = make_model(norm=norm).eval()
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for s in "abcd":
            ln = getattr(model, f"normLN{s}")
            ln.weight.copy_(torch.rand(1024, generator=g) + 0.5)
            ln.bias.copy_(torch.randn(1024, generator=g))
    batch = make_batch((4, 1, 2), seed=8, text_shift=1.0)
    with torch.no_grad():
        z = model.encode(batch, model.graph_for(batch))["l"]
        layers = []
        for k, s in enumerate("abcd"):
            x = batch.text[k]                                   # [T, B, 1024]
            if norm == "LN":
                ln = getattr(model, f"normLN{s}")
                mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
                x = (x - mu) / torch.sqrt(var + 1e-5) * ln.weight + ln.bias
            elif norm == "LN2":                                 # whole [T, 1024] block per dialogue, no affine
                mu = x.mean((0, 2), keepdim=True)
                var = x.var((0, 2), unbiased=False, keepdim=True)
                x = (x - mu) / torch.sqrt(var + 1e-5)
            layers.append(x)
        want = model.gru_l(model.linear_l(sum(layers) / 4))[0]
    valid = batch.umask.t().bool()                              # encoder outputs at padding are never read
    assert_close(z[valid], want[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("modality,norm", [("l", "BN"), ("l", "LN2"), ("a", "BN")])
def test_context_encoder_gradients_equal_the_full_padded_computation(modality, norm):
    # The encoders compute their input layer and the GRU's first projection once per distinct
    # step (a dialogue's padded steps share one row); every gradient of the group through the
    # real steps must be that of the plain computation over all T·B steps. Audio: --av_using_lstm.
    model = make_model(norm=norm, av_using_lstm=modality == "a").train()
    batch = make_batch((5, 1, 3), seed=10, text_shift=1.0)
    valid = batch.umask.t().bool()
    group = model.encoder_groups()[modality]
    z = model.encode(batch, model.graph_for(batch))[modality]
    cotangent = torch.randn(z[valid].shape, generator=torch.Generator().manual_seed(10))
    got = torch.autograd.grad((z[valid] * cotangent).sum(), group)
    if modality == "l":
        full = model.gru_l(model.linear_l(model._normalise_text(batch.text)))[0]
    else:
        full = model.gru_a(model.linear_a(batch.audio))[0]
    assert_close(z[valid], full[valid], rtol=1e-5, atol=1e-5)
    want = torch.autograd.grad((full[valid] * cotangent).sum(), group)
    # linear, 16 GRU tensors, and for the text the four BNs
    assert len(got) == len(group) == {"BN": 26, "LN2": 18}[norm] - (8 if modality == "a" else 0)
    for g_got, g_want in zip(got, want):
        assert_close(g_got, g_want, rtol=1e-4, atol=1e-5)


# =========================================================================== every encoder x norm
@functools.lru_cache(maxsize=None)
def _model_per_base(base_model: str) -> M3Net:
    # Construction does not depend on --norm (all eight text norms always exist), so the four
    # norms share one model per base model; the test sets cfg.norm and clears the gradients.
    return make_model(base_model=base_model, dropout=0.5, num_L=1, num_K=1)


@pytest.mark.parametrize("norm", ["BN", "LN", "LN2", "none"])
@pytest.mark.parametrize("base_model", ["GRU", "LSTM", "Transformer"])
def test_every_base_model_and_norm_runs_forward_and_backward(base_model, norm):
    model = _model_per_base(base_model)
    model.cfg = dataclasses.replace(model.cfg, norm=norm)
    model.zero_grad(set_to_none=True)
    model.train()
    lengths = (3, 1)
    batch = make_batch(lengths, seed=9)
    out = model(batch)
    labels = batch.labels[batch.umask.bool()]
    assert out.log_probs.shape == (4, C) and torch.isfinite(out.log_probs).all()
    loss = F.nll_loss(out.log_probs, labels) + sum(F.cross_entropy(z, labels) for z in out.unimodal_logits.values())
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())

    def moved(name):
        return grads[name] is not None and grads[name].abs().sum() > 0

    context = {"GRU": "gru_l.weight_ih_l0", "LSTM": "lstm_l.weight_ih_l0",
               "Transformer": "trans_l.self_attn.in_proj_weight"}[base_model]
    for name in [context, "linear_l.weight", "linear_a.weight", "linear_v.weight", "graph_model.fc1.weight",
                 "graph_model.hyperconv1.bias", "graph_model.conv1.gate.weight", "graph_model.hyperedge_weight",
                 "graph_model.EW_weight", "graph_model.speaker_embeddings.weight", "smax_fc.weight",
                 "head_l.weight", "head_a.weight", "head_v.weight"]:
        assert moved(name), name
    # positional tables: only the entries this batch uses get a gradient
    n_edges, n_nodes = 4 + 3 * 2, 3 * 4
    assert (grads["graph_model.hyperedge_weight"][n_edges:] == 0).all()
    assert (grads["graph_model.EW_weight"][n_nodes:] == 0).all()
    assert (grads["graph_model.EW_weight"][:n_nodes] != 0).all()
    # the text norm that --norm selects, and only that one, is trained and in the text group
    text_group = {id(p) for p in model.encoder_groups()["l"]}
    for kind in ("BN", "LN"):
        used = norm == kind
        assert moved(f"norm{kind}a.weight") == used, kind
        assert (id(getattr(model, f"norm{kind}a").weight) in text_group) == used, kind


@pytest.mark.parametrize("base_model", ["GRU", "LSTM", "Transformer"])
def test_av_using_lstm_modules_are_named_and_grouped(base_model):
    """--av_using_lstm: the audio/visual RNNs are checkpoint-named modules inside θ_a / θ_v."""
    model = make_model(base_model=base_model, av_using_lstm=True, modals="av")
    prefixes = {k.split(".")[0] for k in model.state_dict()}
    allowed = ({f"norm{k}{s}" for k in ("BN", "LN") for s in "abcd"} | {"linear_a", "linear_v", "linear_l"}
               | {f"{r}_{m}" for r in ("gru", "lstm") for m in "lav"} | {"trans_l", "graph_model", "smax_fc"}
               | {"head_a", "head_v", "head_l"})
    assert prefixes <= allowed, sorted(prefixes - allowed)
    rnn = "gru" if base_model == "GRU" else "lstm"
    other = "lstm" if rnn == "gru" else "gru"
    assert {f"{rnn}_a", f"{rnn}_v"} <= prefixes and f"{other}_a" not in prefixes
    groups = {m: {id(p) for p in ps} for m, ps in model.encoder_groups().items()}
    for m in "av":
        assert {id(p) for p in getattr(model, f"{rnn}_{m}").parameters()} <= groups[m]
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        for m in "av":
            if top.endswith(f"_{m}") and not top.startswith("head_"):
                assert id(p) in groups[m], name
