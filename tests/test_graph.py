"""The conversation graph: hand-computed cases and a naive reference."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from model.graph import (HYPEREDGE_CAPACITY, GraphCapacityError, HighFrequencyConv, HypergraphConv,
                         build_graph)
from model.padding import distinct_rows, expand_rows, project_rows
from model.m3net import M3Net, ModelConfig
from utils.errors import UserError

try:
    from tests import reference_m3net as ref
except ImportError:  # tests/ on sys.path instead of the repo root
    import reference_m3net as ref

assert_close = ref.assert_close
CPU = torch.device("cpu")


def incidence(graph) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit (node, hyperedge) incidence list in the reference's order.

    Per dialogue: the modality hyperedges' members (modality after modality), then each
    utterance hyperedge's members. The operators work on the node list; this
    lets the tests compare them against a scatter implementation.
    """
    nodes, edges = [], []
    for b, n in enumerate(graph.lengths):
        ids = graph.node_ids[b, :, :n].cpu()
        for m in range(graph.n_modalities):
            nodes.append(ids[m])
            edges.append(graph.modality_edge_ids[b, m].cpu().expand(n))
        nodes.append(ids.t().reshape(-1))
        edges.append(graph.utterance_edge_ids[b, :n].cpu().repeat_interleave(graph.n_modalities))
    return torch.cat(nodes), torch.cat(edges)



def leaky(z: float) -> float:
    return z if z > 0 else 0.01 * z


def nodes_from_flat(flat: torch.Tensor, lengths, n_mod: int) -> torch.Tensor:
    """The reference's node order [n_nodes, H] -> the operators' node list [N, M, H]."""
    rows = [torch.stack([flat[ref.node_index(lengths, n_mod, b, m, j)] for m in range(n_mod)])
            for b, n in enumerate(lengths) for j in range(n)]
    return torch.stack(rows)


def flat_of(x: torch.Tensor, lengths) -> torch.Tensor:
    """The operators' node list [N, M, H] -> the reference's node order [n_nodes, H]."""
    starts = [sum(lengths[:b]) for b in range(len(lengths))]
    return torch.cat([x[start: start + n].transpose(0, 1).reshape(-1, x.shape[-1])
                      for start, n in zip(starts, lengths)])


def random_block(lengths, n_mod, h, gen, dtype=torch.float64):
    """Random node features [B, M, T, H] with large finite garbage at the padded positions: the
    reference reads the block, the operators its node list (`DialogueGraph.gather_nodes`)."""
    x = torch.randn(len(lengths), n_mod, max(lengths), h, generator=gen, dtype=dtype)
    pad = ~build_graph(tuple(lengths), n_mod, CPU).valid
    garbage = 100.0 * torch.randn(x.shape, generator=gen, dtype=dtype)
    return torch.where(pad[:, None, :, None], garbage, x)


# =========================================================================== hand-made structure
# Batch: dialogue 0 with 2 utterances, dialogue 1 with 1 utterance, modalities l, a, v.
# Nodes: d0: l1=0 l2=1 a1=2 a2=3 v1=4 v2=5; d1: l1=6 a1=7 v1=8.
# Hyperedges: d0: e0={0,1} (l) e1={2,3} (a) e2={4,5} (v) e3={0,2,4} (utt 1) e4={1,3,5} (utt 2);
#             d1: e5={6} (l) e6={7} (a) e7={8} (v) e8={6,7,8} (utt 1).
HAND_NODES = [0, 1, 2, 3, 4, 5, 0, 2, 4, 1, 3, 5, 6, 7, 8, 6, 7, 8]
HAND_EDGES = [0, 0, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4, 5, 6, 7, 8, 8, 8]
HAND_MEMBERS = {0: [0, 1], 1: [2, 3], 2: [4, 5], 3: [0, 2, 4], 4: [1, 3, 5],
                5: [6], 6: [7], 7: [8], 8: [6, 7, 8]}


def hand_weights(dtype=torch.float64):
    """w_e = e + 1, EW_v = v + 1 (on the full tables)."""
    w = torch.arange(1, HYPEREDGE_CAPACITY + 1, dtype=dtype)
    ew = torch.arange(1, 5200 + 1, dtype=dtype)
    return w, ew


def test_incidence_list_by_hand():
    graph = build_graph((2, 1), 3, CPU)
    nodes, edges = incidence(graph)
    assert nodes.tolist() == HAND_NODES
    assert edges.tolist() == HAND_EDGES
    assert graph.n_nodes == 9 and graph.n_hyperedges == 9
    # node (b, m, t) -> flat id, at the real positions
    assert graph.node_ids[0].tolist() == [[0, 1], [2, 3], [4, 5]]
    assert graph.node_ids[1, :, 0].tolist() == [6, 7, 8]
    assert graph.valid.tolist() == [[True, True], [True, False]]
    assert graph.modality_edge_ids.tolist() == [[0, 1, 2], [5, 6, 7]]
    assert graph.utterance_edge_ids[0].tolist() == [3, 4]
    assert graph.utterance_edge_ids[1, 0].item() == 8
    # the node list: utterances (0, 0), (0, 1), (1, 0), each with its l, a, v nodes
    assert graph.utterance_node_ids.tolist() == [[0, 2, 4], [1, 3, 5], [6, 7, 8]]
    assert graph.utterance_edges.tolist() == [3, 4, 8]
    assert graph.utterance_dialogue.tolist() == [0, 0, 1]
    assert graph.dialogue_members.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    assert torch.equal(flat_of(nodes_from_flat(torch.arange(9.0)[:, None], [2, 1], 3), [2, 1]),
                       torch.arange(9.0)[:, None])
    # the naive reference builds the same list (so it can be trusted below)
    assert ref.incidence([2, 1], 3) == (HAND_NODES, HAND_EDGES)


def test_incidence_list_subset_of_modalities_by_hand():
    # modals 'al' -> nodes per dialogue [l.., a..]; lengths (1, 2)
    # d0: l1=0 a1=1; e0={0} e1={1} e2={0,1}; d1: l1=2 l2=3 a1=4 a2=5; e3={2,3} e4={4,5} e5={2,4} e6={3,5}
    graph = build_graph((1, 2), 2, CPU)
    nodes, edges = incidence(graph)
    assert nodes.tolist() == [0, 1, 0, 1, 2, 3, 4, 5, 2, 4, 3, 5]
    assert edges.tolist() == [0, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    assert ref.incidence([1, 2], 2) == (nodes.tolist(), edges.tolist())


def test_degrees_by_hand():
    w, ew = hand_weights()
    d, b = ref.degrees(HAND_NODES, HAND_EDGES, 9, 9, w, ew)
    # D_v = sum of w_e over v's two hyperedges; B_e = sum of (v + 1) over its members
    assert d.tolist() == [1 + 4, 1 + 5, 2 + 4, 2 + 5, 3 + 4, 3 + 5, 6 + 9, 7 + 9, 8 + 9]
    assert b.tolist() == [3, 7, 11, 9, 12, 7, 8, 9, 24]


def test_hypergraph_propagation_matrix_by_hand():
    """One-hot node features expose P[v, u] = D_v^-1 sum_{e ∋ v, u} B_e^-1 of the dense operator."""
    w, ew = hand_weights()
    d_hand = [5, 6, 6, 7, 7, 8, 15, 16, 17]
    b_hand = [3, 7, 11, 9, 12, 7, 8, 9, 24]
    expected = torch.zeros(9, 9, dtype=torch.float64)
    for e, members in HAND_MEMBERS.items():
        for v in members:
            for u in members:
                expected[v, u] += 1.0 / b_hand[e] / d_hand[v]
    graph = build_graph((2, 1), 3, CPU)
    conv = HypergraphConv(9).double()
    x = nodes_from_flat(torch.eye(9, dtype=torch.float64), [2, 1], 3)
    out = flat_of(conv(x, graph, w, ew), [2, 1])
    assert_close(out, expected, rtol=0, atol=1e-12)


def test_hypergraph_step_by_hand():
    w, ew = hand_weights()
    # x_v = (v, 1); m_e = (sum of member ids, |e|) / B_e
    m = {0: (1 / 3, 2 / 3), 1: (5 / 7, 2 / 7), 2: (9 / 11, 2 / 11), 3: (6 / 9, 3 / 9), 4: (9 / 12, 3 / 12),
         5: (6 / 7, 1 / 7), 6: (7 / 8, 1 / 8), 7: (8 / 9, 1 / 9), 8: (21 / 24, 3 / 24)}
    edges_of = {0: (0, 3, 5), 1: (0, 4, 6), 2: (1, 3, 6), 3: (1, 4, 7), 4: (2, 3, 7), 5: (2, 4, 8),
                6: (5, 8, 15), 7: (6, 8, 16), 8: (7, 8, 17)}     # node: (edge, edge, D_v)
    bias = (0.1, -1.0)
    expected = [[leaky((m[e1][c] + m[e2][c]) / dv + bias[c]) for c in range(2)]
                for e1, e2, dv in edges_of.values()]
    assert expected[0] == pytest.approx([0.3, -0.008])   # (1/3+2/3)/5 + .1, leaky((2/3+1/3)/5 - 1)

    flat = torch.stack([torch.arange(9, dtype=torch.float64), torch.ones(9, dtype=torch.float64)], 1)
    conv = HypergraphConv(2).double()
    with torch.no_grad():
        conv.bias.copy_(torch.tensor(bias, dtype=torch.float64))
    graph = build_graph((2, 1), 3, CPU)
    out = conv(nodes_from_flat(flat, [2, 1], 3), graph, w, ew)
    assert_close(flat_of(out, [2, 1]), torch.tensor(expected, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    ref_out = ref.hypergraph_layer(flat, HAND_NODES, HAND_EDGES, w, ew, conv.bias)
    assert_close(ref_out, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_hypergraph_zero_degrees_give_zero_not_nan():
    w, ew = hand_weights()
    w[5] = 0.0
    w[8] = 0.0      # node 6 (e5, e8): D = 0
    ew[7] = 0.0     # e6 = {7}: B = 0
    bias = (0.1, -1.0)
    flat = torch.stack([torch.arange(9, dtype=torch.float64), torch.ones(9, dtype=torch.float64)], 1)
    conv = HypergraphConv(2).double()
    with torch.no_grad():
        conv.bias.copy_(torch.tensor(bias, dtype=torch.float64))
    out = flat_of(conv(nodes_from_flat(flat, [2, 1], 3), build_graph((2, 1), 3, CPU), w, ew), [2, 1])
    assert torch.isfinite(out).all()
    # node 6: D_6 = 0 -> only the bias
    assert out[6].tolist() == pytest.approx([leaky(0.1), leaky(-1.0)])
    # node 7: m_e6 = 0 (B = 0), e8 = {6,7,8} has B = 7 + 0 + 9 = 16, D_7 = w_6 + w_8 = 7
    m8 = (21 / 16, 3 / 16)
    assert out[7].tolist() == pytest.approx([leaky(m8[0] / 7 + 0.1), leaky(m8[1] / 7 - 1.0)])
    # node 8: e7 = {8} B = 9, D_8 = 8 + 0
    assert out[8].tolist() == pytest.approx([leaky((8 / 9 + m8[0]) / 8 + 0.1), leaky((1 / 9 + m8[1]) / 8 - 1.0)])
    ref_out = ref.hypergraph_layer(flat, HAND_NODES, HAND_EDGES, w, ew, conv.bias)
    assert_close(out, ref_out, rtol=0, atol=1e-12)


# =========================================================================== high-frequency, by hand
def _hand_gate(conv: HighFrequencyConv):
    # gate([x_t; x_s]) = 0.5 x_t0 - 0.5 x_t1 + 1 x_s0 + 2 x_s1 + 0.1
    with torch.no_grad():
        conv.gate.weight.copy_(torch.tensor([[0.5, -0.5, 1.0, 2.0]]))
        conv.gate.bias.fill_(0.1)


# three nodes p=(1,0), q=(0,1), r=(1,1), all connected, out-degree 2 -> factor 1/2.
# target scores a: p .5, q -.5, r 0; source scores c (+.1): p 1.1, q 2.1, r 3.1
HF_EXPECTED = [
    [0.5 * math.tanh(3.6), 0.5 * (math.tanh(2.6) + math.tanh(3.6))],    # p <- q (2.6), r (3.6)
    [0.5 * (math.tanh(0.6) + math.tanh(2.6)), 0.5 * math.tanh(2.6)],    # q <- p (0.6), r (2.6)
    [0.5 * math.tanh(1.1), 0.5 * math.tanh(2.1)],                       # r <- p (1.1), q (2.1)
]
HF_X = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
# DialogueGraph keeps deg^-1/2 deg^-1/2 as a float32 table: exact to float32 precision only.
HF_RTOL = 2e-7


def test_high_frequency_one_utterance_three_modalities_by_hand():
    conv = HighFrequencyConv(2).double()
    _hand_gate(conv)
    x = torch.tensor(HF_X, dtype=torch.float64)[None]                   # [N=1, M=3, 2]
    out = conv(x, build_graph((1,), 3, CPU))
    assert_close(out[0], torch.tensor(HF_EXPECTED, dtype=torch.float64), rtol=HF_RTOL, atol=0)


def test_high_frequency_three_utterances_one_modality_by_hand():
    conv = HighFrequencyConv(2).double()
    _hand_gate(conv)
    x = torch.tensor(HF_X, dtype=torch.float64)[:, None]                # [N=3, M=1, 2]
    out = conv(x, build_graph((3,), 1, CPU))
    assert_close(out[:, 0], torch.tensor(HF_EXPECTED, dtype=torch.float64), rtol=HF_RTOL, atol=0)
    # next to a 1-utterance dialogue (padded to 3 in the within-modality block): same result,
    # and the lone node gets nothing
    x2 = torch.cat([x, torch.tensor([[[4.0, -2.0]]], dtype=torch.float64)])
    out2 = conv(x2, build_graph((3, 1), 1, CPU))
    assert_close(out2[:3, 0], torch.tensor(HF_EXPECTED, dtype=torch.float64), rtol=HF_RTOL, atol=0)
    assert out2[3, 0].tolist() == [0.0, 0.0]


def test_high_frequency_edge_set_two_by_two_by_hand():
    """2 utterances x 2 modalities: l1-l2, a1-a2, l1-a1, l2-a2 connected, l1-a2 and l2-a1 not."""
    conv = HighFrequencyConv(2).double()
    with torch.no_grad():
        conv.gate.weight.zero_()
        conv.gate.bias.fill_(0.7)
    t = math.tanh(0.7)
    l1, l2, a1, a2 = [1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]
    x = torch.tensor([[l1, a1], [l2, a2]], dtype=torch.float64)         # [N=2, M=2, 2]
    out = conv(x, build_graph((2,), 2, CPU)).transpose(0, 1)           # [M, N, 2]: as listed below
    # out-degree 2 everywhere -> factor 1/2
    expected = torch.tensor([[[0.5 * t * 2, 0.5 * t * 1],      # l1 <- l2 + a1
                              [0.5 * t * 1, 0.5 * t * 3]],     # l2 <- l1 + a2
                             [[0.5 * t * 1, 0.5 * t * 3],      # a1 <- a2 + l1
                              [0.5 * t * 2, 0.5 * t * 1]]],    # a2 <- a1 + l2
                            dtype=torch.float64)
    assert_close(out, expected, rtol=HF_RTOL, atol=0)


def test_high_frequency_degree_per_dialogue():
    """Constant gate: the message is deg^-1 * sum of neighbours, deg = (n - 1) + (M - 1) per dialogue."""
    conv = HighFrequencyConv(1).double()
    with torch.no_grad():
        conv.gate.weight.zero_()
        conv.gate.bias.fill_(100.0)                                     # tanh = 1
    lengths = (4, 1, 2)
    x = torch.ones(7, 3, 1, dtype=torch.float64)                        # [N, M, 1]
    out = conv(x, build_graph(lengths, 3, CPU))
    # every node has deg neighbours of value 1 -> output 1 (0 for none); deg: 5, 2, 3
    assert_close(out, torch.ones(7, 3, 1, dtype=torch.float64))
    x[4] = 2.0                                                          # dialogue 1's one utterance
    out = conv(x, build_graph(lengths, 3, CPU))
    assert_close(out[4], torch.full((3, 1), 2.0, dtype=torch.float64))
    # one modality, one utterance: no edge at all
    out = conv(torch.ones(1, 1, 1, dtype=torch.float64), build_graph((1,), 1, CPU))
    assert out.item() == 0.0


# =========================================================================== capacity and caching
def test_capacity_boundary_and_error_message():
    # 10 dialogues, 3 modalities: hyperedges = utterances + 30
    ok = build_graph((97,) * 10, 3, CPU)                  # exactly 1000 hyperedges
    assert ok.n_hyperedges == HYPEREDGE_CAPACITY
    with pytest.raises(GraphCapacityError) as err:
        build_graph((97,) * 9 + (98,), 3, CPU)            # 1001
    assert isinstance(err.value, UserError)
    assert "--batch-size" in str(err.value)
    assert "1001" in str(err.value)
    with pytest.raises(GraphCapacityError, match="--batch-size"):
        build_graph((1800,), 3, CPU)                      # 5400 nodes, 1803 hyperedges


def test_build_graph_is_cached_per_shape():
    g1 = build_graph((3, 2, 5), 3, CPU)
    assert build_graph((3, 2, 5), 3, CPU) is g1
    assert build_graph((3, 2, 5), 2, CPU) is not g1
    assert build_graph((3, 5, 2), 3, CPU) is not g1


# =========================================================================== against the naive reference
SHAPES = [(1,), (3, 1, 4), (5, 2), (1, 1, 1), (6,), (2, 7, 1, 3)]


def _random_weights(gen, dtype=torch.float64):
    w = torch.rand(HYPEREDGE_CAPACITY, generator=gen, dtype=dtype) * 1.8 + 0.2
    ew = torch.rand(5200, generator=gen, dtype=dtype) * 1.8 + 0.2
    return w, ew


@pytest.mark.parametrize("n_mod", [1, 2, 3])
def test_hypergraph_conv_matches_reference(n_mod):
    gen = torch.Generator().manual_seed(10 + n_mod)
    conv = HypergraphConv(6).double()
    with torch.no_grad():
        conv.bias.normal_(generator=gen)
    for lengths in SHAPES:
        w, ew = _random_weights(gen)
        x = random_block(lengths, n_mod, 6, gen)
        graph = build_graph(lengths, n_mod, CPU)
        got = flat_of(conv(graph.gather_nodes(x), graph, w, ew), lengths)
        nodes, edges = ref.incidence(lengths, n_mod)
        want = ref.hypergraph_layer(ref.flatten_nodes(x, lengths), nodes, edges, w, ew, conv.bias)
        assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n_mod", [1, 2, 3])
def test_high_frequency_conv_matches_reference(n_mod):
    gen = torch.Generator().manual_seed(20 + n_mod)
    conv = HighFrequencyConv(6).double()
    for lengths in SHAPES:
        with torch.no_grad():
            conv.gate.weight.normal_(generator=gen)
            conv.gate.bias.normal_(generator=gen)
        x = random_block(lengths, n_mod, 6, gen)
        graph = build_graph(lengths, n_mod, CPU)
        got = flat_of(conv(graph.gather_nodes(x), graph), lengths)
        src, dst = ref.high_frequency_edges(lengths, n_mod)
        want = ref.high_frequency_layer(ref.flatten_nodes(x, lengths), src, dst, conv.gate)
        assert_close(got, want, rtol=HF_RTOL, atol=1e-9)


def test_operators_batch_leading_dimensions():
    gen = torch.Generator().manual_seed(3)
    lengths = (3, 1, 2)
    graph = build_graph(lengths, 3, CPU)
    x = graph.gather_nodes(torch.stack([random_block(lengths, 3, 5, gen) for _ in range(4)]))   # [K=4, N, M, H]
    w, ew = _random_weights(gen)
    hyper, high = HypergraphConv(5).double(), HighFrequencyConv(5).double()
    out_h, out_f = hyper(x, graph, w, ew), high(x, graph)
    for k in range(4):
        assert_close(out_h[k], hyper(x[k], graph, w, ew))
        assert_close(out_f[k], high(x[k], graph))


FUSE_CASES = [
    # modals, num_L, num_K, use_residue, lengths
    ("avl", 1, 1, False, (3, 1, 4)),
    ("avl", 0, 0, False, (2, 5)),
    ("avl", 3, 2, True, (1,)),
    ("avl", 2, 3, False, (4, 1, 2)),
    ("al", 2, 0, True, (3, 1)),
    ("al", 0, 3, False, (2, 2, 1)),
    ("l", 1, 2, False, (1, 3)),
    ("l", 3, 1, True, (5,)),
    ("v", 2, 2, False, (2, 1, 3)),
    ("v", 0, 1, True, (1, 1)),
]


def _fuse_model(modals, num_L, num_K, use_residue, seed):
    torch.manual_seed(seed)
    cfg = ModelConfig(n_classes=5, n_speakers=3, audio_dim=8, visual_dim=8, modals=modals,
                      base_model="GRU", num_L=num_L, num_K=num_K, use_residue=use_residue)
    model = M3Net(cfg).eval()
    gm = model.graph_model
    with torch.no_grad():
        gm.hyperedge_weight.uniform_(0.2, 2.0)   # positional: a wrong index changes the result
        gm.EW_weight.uniform_(0.2, 2.0)
        for i in range(1, num_L + 1):
            getattr(gm, f"hyperconv{i}").bias.normal_(0.0, 0.1)
        for k in range(1, num_K + 1):
            getattr(gm, f"conv{k}").gate.weight.normal_(0.0, 0.05)
            getattr(gm, f"conv{k}").gate.bias.normal_(0.0, 0.5)
    return model


def _double_graph(model):
    """float64 for what fuse reads (the graph stage and smax_fc); the encoders stay as they are."""
    model.graph_model.double()
    model.smax_fc.double()
    return model


@pytest.mark.parametrize("modals,num_L,num_K,use_residue,lengths", FUSE_CASES)
def test_fuse_matches_reference(modals, num_L, num_K, use_residue, lengths):
    model = _double_graph(_fuse_model(modals, num_L, num_K, use_residue, seed=31 * len(modals) + 7 * num_L + num_K))
    gen = torch.Generator().manual_seed(num_L * 10 + num_K)
    nodes = random_block(lengths, len(modals), 1024, gen)
    graph = build_graph(lengths, len(modals), CPU)
    with torch.no_grad():
        got = model.fuse(graph.gather_nodes(nodes), graph, dropout=False)
        want = ref.fuse(model, nodes, lengths)
    assert got.shape == (sum(lengths), 5)
    assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_fuse_matches_reference_float32():
    model = _fuse_model("avl", 2, 2, True, seed=5)
    lengths = (4, 1, 3)
    gen = torch.Generator().manual_seed(5)
    nodes = random_block(lengths, 3, 1024, gen, dtype=torch.float32)
    graph = build_graph(lengths, 3, CPU)
    with torch.no_grad():
        got = model.fuse(graph.gather_nodes(nodes), graph, dropout=False)
        h = model.graph_model(graph.gather_nodes(nodes), graph)
        want_h = ref.graph_model(_double_graph(model).graph_model, nodes.double(), lengths)
        want = ref.fuse(model, nodes.double(), lengths)
    assert_close(h.double(), want_h, rtol=1e-5, atol=1e-5)
    assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("modals,use_residue", [("avl", True), ("al", False)])
def test_coalition_fuse_matches_reference(modals, use_residue):
    model = _double_graph(_fuse_model(modals, 2, 2, use_residue, seed=11))
    lengths = (3, 1, 2)
    gen = torch.Generator().manual_seed(11)
    nodes = random_block(lengths, len(modals), 1024, gen)
    n_mod = len(modals)
    coalitions = torch.tensor([[bool(k >> m & 1) for m in range(n_mod)] for k in range(2 ** n_mod)])
    with torch.no_grad():
        graph = build_graph(lengths, n_mod, CPU)
        got = model.fuse(graph.gather_nodes(nodes), graph, coalitions, dropout=False)
        for k, coalition in enumerate(coalitions.tolist()):
            want = ref.fuse(model, nodes, lengths, coalition)
            assert_close(got[k], want, rtol=1e-6, atol=1e-7)


def test_project_rows_applies_the_linear_to_the_listed_rows_only():
    linear = nn.Linear(2, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        linear.bias.copy_(torch.tensor([10.0, 20.0, 30.0]))
    x = torch.arange(12.0).view(2, 3, 2)                   # rows (0,0)=[0,1] ... (1,2)=[10,11]
    out = project_rows(linear, x, torch.tensor([1, 5]))
    assert out.shape == (2, 3, 3)
    assert out[0, 1].tolist() == [12.0, 23.0, 35.0]          # [2, 3]
    assert out[1, 2].tolist() == [20.0, 31.0, 51.0]          # [10, 11]
    assert out.abs().sum().item() == 12 + 23 + 35 + 20 + 31 + 51


def test_utterances_in_order_on_a_sequence_first_tensor():
    # lengths (2, 1), B = 2: sequence-first positions t*B + b of utterances (0,0) (0,1) (1,0)
    graph = build_graph((2, 1), 1, CPU)
    assert graph.utterance_steps.tolist() == [0, 2, 1]
    x = torch.arange(4.0).view(2, 2, 1)                      # [T=2, B=2, 1]: x[t, b] = 2t + b
    assert graph.gather_utterances(x)[:, 0].tolist() == [0.0, 2.0, 1.0]
    out = project_rows(lambda rows: rows * 10, x, graph.utterance_steps)
    assert out[..., 0].tolist() == [[0.0, 10.0], [20.0, 0.0]]   # the padded step (t, b) = (1, 1): 0


def test_padded_steps_share_the_first_padded_step_by_hand():
    # lengths (3, 1, 2), sequence-first positions t*B + b with B = 3. Dialogue 1's padded steps
    # (t = 1, 2) share position 4, dialogue 2's (t = 2) is position 8 itself.
    graph = build_graph((3, 1, 2), 1, CPU)
    assert graph.distinct_steps.tolist() == [0, 1, 2, 3, 4, 5, 6, 8]
    assert graph.step_rows.tolist() == [[0, 1, 2], [3, 4, 5], [6, 4, 7]]
    # no padding: every step is its own row
    full = build_graph((2, 2), 1, CPU)
    assert full.distinct_steps.tolist() == [0, 1, 2, 3]
    assert full.step_rows.tolist() == [[0, 1], [2, 3]]


def test_distinct_rows_round_trip_on_zero_padding():
    lengths = (3, 1, 2)
    graph = build_graph(lengths, 1, CPU)
    x = torch.randn(3, 3, 4)
    for b, n in enumerate(lengths):
        x[n:, b] = 0.0                                      # the loader's zero padding
    x = torch.layer_norm(x, (4,)) * 2 + 1                   # a per-step norm maps the zeros to one row
    rows = distinct_rows(x, graph.distinct_steps)
    assert rows.shape == (8, 4)
    assert torch.equal(expand_rows(rows, graph.step_rows), x)


def test_gather_and_scatter_nodes_by_hand():
    # lengths (2, 1), two modalities: x[b, m, t] = 100 b + 10 m + t, one feature.
    graph = build_graph((2, 1), 2, torch.device("cpu"))
    b, m, t = torch.meshgrid(torch.arange(2), torch.arange(2), torch.arange(2), indexing="ij")
    x = (100 * b + 10 * m + t).float()[..., None]                            # [B, M, T, 1]
    # utterances (0, 0), (0, 1), (1, 0); each: modality 0's node, then modality 1's
    assert graph.gather_nodes(x).tolist() == [[[0.0], [10.0]], [[1.0], [11.0]], [[100.0], [110.0]]]
    stacked = torch.stack([x, -x])                                           # a leading coalition dimension
    assert torch.equal(graph.gather_nodes(stacked)[1], -graph.gather_nodes(x))
    # and back: the padded position (b, t) = (1, 1) is 0
    assert graph.scatter_nodes(graph.gather_nodes(x))[..., 0].tolist() == [[[0.0, 1.0], [10.0, 11.0]],
                                                                          [[100.0, 0.0], [110.0, 0.0]]]
    assert torch.equal(graph.scatter_nodes(graph.gather_nodes(stacked))[1], -graph.scatter_nodes(graph.gather_nodes(x)))
