"""A deliberately naive re-implementation of M3Net's forward from its node features on, for tests only.

It follows the reference M3Net layout literally: the valid nodes of each dialogue are
flattened as ``[l_1..l_n, a_1..a_n, v_1..v_n]`` (present modalities only, in the order l, a, v),
dialogues concatenated; the hypergraph is an explicit incidence list built with Python loops;
hypergraph propagation uses ``index_add``; the high-frequency branch runs over an explicit
directed edge list. Nothing here is shared with ``model/graph.py`` except the parameters that
are read from the module under test.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------- layout
def flatten_nodes(x: torch.Tensor, lengths) -> torch.Tensor:
    """x [B, M, T, H] (padded block) -> [sum_b M*n_b, H] in the reference order."""
    rows = []
    for b, n in enumerate(lengths):
        for m in range(x.shape[1]):
            for j in range(n):
                rows.append(x[b, m, j])
    return torch.stack(rows)


def node_index(lengths, n_modalities: int, b: int, m: int, j: int) -> int:
    """Global flat index of node (dialogue b, modality m, utterance j)."""
    offset = n_modalities * sum(lengths[:b])
    return offset + m * lengths[b] + j


def per_utterance(flat: torch.Tensor, lengths, n_modalities: int) -> torch.Tensor:
    """[n_nodes, F] -> [N, M*F]: per utterance, its nodes concatenated in modality order."""
    rows = []
    for b, n in enumerate(lengths):
        for j in range(n):
            rows.append(torch.cat([flat[node_index(lengths, n_modalities, b, m, j)]
                                   for m in range(n_modalities)]))
    return torch.stack(rows)


# --------------------------------------------------------------------------- structure
def incidence(lengths, n_modalities: int) -> tuple[list[int], list[int]]:
    """(node ids, hyperedge ids): per dialogue the modality hyperedges, then one per utterance."""
    nodes, edges = [], []
    edge = 0
    for b, n in enumerate(lengths):
        for m in range(n_modalities):
            for j in range(n):
                nodes.append(node_index(lengths, n_modalities, b, m, j))
                edges.append(edge)
            edge += 1
        for j in range(n):
            for m in range(n_modalities):
                nodes.append(node_index(lengths, n_modalities, b, m, j))
                edges.append(edge)
            edge += 1
    return nodes, edges


def high_frequency_edges(lengths, n_modalities: int) -> tuple[list[int], list[int]]:
    """Directed edges (sources, targets): distinct same-modality pairs, distinct same-utterance pairs."""
    src, dst = [], []
    for b, n in enumerate(lengths):
        for m in range(n_modalities):
            for i in range(n):
                for j in range(n):
                    if i != j:
                        src.append(node_index(lengths, n_modalities, b, m, i))
                        dst.append(node_index(lengths, n_modalities, b, m, j))
        for j in range(n):
            for m1 in range(n_modalities):
                for m2 in range(n_modalities):
                    if m1 != m2:
                        src.append(node_index(lengths, n_modalities, b, m1, j))
                        dst.append(node_index(lengths, n_modalities, b, m2, j))
    return src, dst


# --------------------------------------------------------------------------- operators
def _inv(z: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(z)
    nz = z != 0
    out[nz] = 1.0 / z[nz]
    return out


def degrees(node_ids, edge_ids, n_nodes: int, n_edges: int,
            hyperedge_weight: torch.Tensor, node_weight: torch.Tensor):
    """D_v = sum_{e contains v} w_e,  B_e = sum_{v in e} EW[v]."""
    node_ids = torch.as_tensor(node_ids)
    edge_ids = torch.as_tensor(edge_ids)
    w = hyperedge_weight.detach()
    ew = node_weight.detach()
    d = torch.zeros(n_nodes, dtype=w.dtype).index_add_(0, node_ids, w[edge_ids])
    b = torch.zeros(n_edges, dtype=ew.dtype).index_add_(0, edge_ids, ew[node_ids])
    return d, b


def hypergraph_layer(x: torch.Tensor, node_ids, edge_ids, hyperedge_weight: torch.Tensor,
                     node_weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x [n_nodes, H] -> LeakyReLU(D^-1 sum_e B_e^-1 sum_{u in e} x_u + bias)."""
    node_ids = torch.as_tensor(node_ids)
    edge_ids = torch.as_tensor(edge_ids)
    n_nodes, n_edges = x.shape[0], int(edge_ids.max()) + 1
    d = torch.zeros(n_nodes, dtype=x.dtype).index_add_(0, node_ids, hyperedge_weight[edge_ids].to(x.dtype))
    b = torch.zeros(n_edges, dtype=x.dtype).index_add_(0, edge_ids, node_weight[node_ids].to(x.dtype))
    edge_feat = torch.zeros(n_edges, x.shape[1], dtype=x.dtype).index_add_(0, edge_ids, x[node_ids])
    edge_feat = edge_feat * _inv(b)[:, None]
    out = torch.zeros_like(x).index_add_(0, node_ids, edge_feat[edge_ids]) * _inv(d)[:, None]
    return F.leaky_relu(out + bias.to(x.dtype), negative_slope=0.01)


def high_frequency_layer(x: torch.Tensor, src, dst, gate: torch.nn.Linear) -> torch.Tensor:
    """sum over s->t of deg(s)^-1/2 deg(t)^-1/2 tanh(gate([x_t; x_s])) x_s, at t."""
    out = torch.zeros_like(x)
    if not src:
        return out
    src = torch.as_tensor(src)
    dst = torch.as_tensor(dst)
    deg = torch.zeros(x.shape[0], dtype=x.dtype).index_add_(0, src, torch.ones(len(src), dtype=x.dtype))
    coef = deg[src].pow(-0.5) * deg[dst].pow(-0.5)
    g = torch.tanh(F.linear(torch.cat([x[dst], x[src]], dim=-1), gate.weight.to(x.dtype),
                            gate.bias.to(x.dtype))).squeeze(-1)
    return out.index_add_(0, dst, (coef * g)[:, None] * x[src])


# --------------------------------------------------------------------------- whole graph stage
def graph_model(gm, nodes: torch.Tensor, lengths, coalition=None) -> torch.Tensor:
    """GraphModel forward: nodes [B, M, T, D] -> per-utterance features [N, M*F].

    `coalition`: per modality (node order) True/False; absent modalities' nodes are zeroed
    before fc1.
    """
    cfg = gm.cfg
    n_mod = nodes.shape[1]
    lengths = list(lengths)
    if coalition is not None:
        nodes = nodes.clone()
        for m, present in enumerate(coalition):
            if not present:
                nodes[:, m] = 0.0
    feat = flatten_nodes(nodes, lengths)
    x = F.linear(feat, gm.fc1.weight, gm.fc1.bias)
    node_ids, edge_ids = incidence(lengths, n_mod)
    hyper = x
    for i in range(1, cfg.num_L + 1):
        hyper = hypergraph_layer(hyper, node_ids, edge_ids, gm.hyperedge_weight, gm.EW_weight,
                                 getattr(gm, f"hyperconv{i}").bias)
    src, dst = high_frequency_edges(lengths, n_mod)
    g = x
    for k in range(1, cfg.num_K + 1):
        g = g + high_frequency_layer(g, src, dst, getattr(gm, f"conv{k}").gate)
    parts = [hyper, g]
    if cfg.use_residue:
        parts.insert(0, feat)
    return per_utterance(torch.cat(parts, dim=-1), lengths, n_mod)


def fuse(model, nodes: torch.Tensor, lengths, coalition=None) -> torch.Tensor:
    """M3Net.fuse without dropout: log_softmax(smax_fc(relu(h)))."""
    h = graph_model(model.graph_model, nodes, lengths, coalition)
    return F.log_softmax(F.linear(F.relu(h), model.smax_fc.weight, model.smax_fc.bias), dim=-1)


# --------------------------------------------------------------------------- test helper
def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """|got - want| <= atol + rtol |want| elementwise, same shape (dtype-agnostic).

    torch.testing.assert_close would do, but its first call imports torch.distributed and sympy
    (seconds on a loaded 2-core machine).
    """
    assert got.shape == want.shape, f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.detach().double(), want.detach().double()
    diff = (got - want).abs()
    bad = diff > atol + rtol * want.abs()
    if bad.any() or not torch.isfinite(got).all() or not torch.isfinite(want).all():
        idx = int(bad.flatten().nonzero()[0]) if bad.any() else -1
        raise AssertionError(
            f"{int(bad.sum())}/{bad.numel()} elements differ; max abs diff {diff.max().item():.3e} "
            f"(rtol {rtol}, atol {atol}); first at flat index {idx}: "
            f"{got.flatten()[idx].item() if idx >= 0 else None} vs {want.flatten()[idx].item() if idx >= 0 else None}")
