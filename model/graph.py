"""The conversation graph of M3Net and its two operators, in plain torch.

Layout. Node features are a list of the real utterances' nodes, `x[..., N, M, H]`: utterance n
(dialogue after dialogue, `DialogueGraph.gather_utterances`' order), modality m (present
modalities in the order l, a, v); no padding, so nothing is computed for padded positions.
The reference flattens the nodes dialogue after dialogue as `[l_1..l_n, a_1..a_n, v_1..v_n]`;
node (b, m, t) has that flat index `node_offset[b] + m * n_b + t`, which is what the positional
weights are looked up with. The messages within a modality, a [T, T] product per dialogue and
modality, go through a padded block [..., B, M, T, H] (zero at padding) and back. Leading
dimensions (`...`) batch several coalitions through one pass.

Hyperedges per dialogue, globally numbered in this order: one per modality (its n nodes), then
one per utterance t (its M nodes). High-frequency edges: every ordered pair of distinct nodes of
one modality, and every ordered pair among the M nodes of one utterance.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import UserError

# Sizes of M3Net's positional weight tables (fixed by its checkpoint).
HYPEREDGE_CAPACITY = 1000
NODE_CAPACITY = 5200


class GraphCapacityError(UserError):
    """A batch needs more hyperedges or nodes than M3Net's positional weight tables hold."""


def _inverse_or_zero(z: torch.Tensor) -> torch.Tensor:
    """1/z with 1/0 := 0, the reference's convention for empty degrees."""
    return torch.where(z == 0, torch.zeros_like(z), 1.0 / z)


@dataclass(frozen=True)
class DialogueGraph:
    """Index tensors of one batch shape: a tuple of dialogue lengths and a modality count."""

    lengths: tuple[int, ...]
    n_modalities: int
    valid: torch.Tensor               # [B, T] bool
    node_ids: torch.Tensor            # [B, M, T] flat node index (0 at padding)
    modality_edge_ids: torch.Tensor   # [B, M] hyperedge index of (dialogue, modality)
    utterance_edge_ids: torch.Tensor  # [B, T] hyperedge index of (dialogue, utterance) (0 at padding)
    high_freq_norm: torch.Tensor      # [N] deg^-1/2 · deg^-1/2 of each utterance's nodes (0: no edge)
    flat_valid: torch.Tensor          # [N] positions b*T + t of the real utterances
    utterance_steps: torch.Tensor     # [N] their sequence-first positions t*B + b
    utterance_dialogue: torch.Tensor  # [N] the dialogue of each utterance
    dialogue_members: torch.Tensor    # [B, N] float 1 where utterance n is in dialogue b (segment sums)
    utterance_node_ids: torch.Tensor  # [N, M] flat node index of each utterance's nodes
    utterance_edges: torch.Tensor     # [N] hyperedge index of each utterance
    utterance_nodes: torch.Tensor     # [N*M] positions (b*M + m)*T + t of the real nodes, utterance by
                                      #     utterance (as flat_valid), modality by modality within each
    distinct_steps: torch.Tensor      # [R] sequence-first positions t*B + b: each real step, and each
                                      #     padded dialogue's first padded step (standing for all of them)
    step_rows: torch.Tensor           # [T, B] each step's row in `distinct_steps` (a padded step: the
                                      #     shared one; model/padding.py: distinct_rows, expand_rows)
    other_real_sources: torch.Tensor  # [B, 1, T, T] bool: s ≠ t and s real (high-frequency edges t <- s)
    other_modalities: torch.Tensor    # [M, M] bool: m ≠ m'

    @property
    def n_nodes(self) -> int:
        return self.n_modalities * sum(self.lengths)

    @property
    def n_hyperedges(self) -> int:
        return sum(self.lengths) + self.n_modalities * len(self.lengths)

    def gather_utterances(self, x: torch.Tensor) -> torch.Tensor:
        """Sequence-first [T, B, ...] -> [N, ...]: the real utterances, dialogue after dialogue."""
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.utterance_steps)

    def gather_nodes(self, x: torch.Tensor) -> torch.Tensor:
        """[..., B, M, T, D] -> [..., N, M, D]: each real utterance's nodes, modality after
        modality, utterances as `gather_utterances` orders them."""
        lead, d = x.shape[:-4], x.shape[-1]
        nodes = x.reshape(*lead, -1, d).index_select(-2, self.utterance_nodes)
        return nodes.view(*lead, -1, self.n_modalities, d)

    def scatter_nodes(self, x: torch.Tensor) -> torch.Tensor:
        """[..., N, M, D] -> [..., B, M, T, D], 0 at padding: the inverse of `gather_nodes`."""
        lead, d = x.shape[:-3], x.shape[-1]
        batch, steps = self.valid.shape
        block = x.new_zeros(*lead, batch * self.n_modalities * steps, d)
        block.index_copy_(-2, self.utterance_nodes, x.reshape(*lead, -1, d))
        return block.view(*lead, batch, self.n_modalities, steps, d)


def check_capacity(lengths: tuple[int, ...], n_modalities: int, what: str = "a batch") -> None:
    """GraphCapacityError if dialogues of these lengths need more hyperedges or nodes than M3Net's
    positional weight tables hold; `what` names the batch in the message."""
    n_dialogues, n_utterances = len(lengths), sum(lengths)
    n_nodes = n_modalities * n_utterances
    n_edges = n_utterances + n_modalities * n_dialogues
    if n_edges > HYPEREDGE_CAPACITY or n_nodes > NODE_CAPACITY:
        raise GraphCapacityError(
            f"{what} of {n_dialogues} dialogues ({n_utterances} utterances) needs {n_edges} hyperedges "
            f"and {n_nodes} nodes, but M3Net's weight tables hold {HYPEREDGE_CAPACITY} and {NODE_CAPACITY}: "
            f"use a smaller --batch-size")


@functools.lru_cache(maxsize=512)
def build_graph(lengths: tuple[int, ...], n_modalities: int, device: torch.device) -> DialogueGraph:
    """Index structure for dialogues of these lengths, built once per batch shape and device."""
    check_capacity(lengths, n_modalities)
    n_dialogues, max_len = len(lengths), max(lengths)
    length = torch.tensor(lengths)
    t = torch.arange(max_len)
    valid = t[None, :] < length[:, None]
    utterance_offset = torch.cumsum(length, 0) - length                   # utterances before dialogue b
    node_offset = n_modalities * utterance_offset
    node_ids = node_offset[:, None, None] + torch.arange(n_modalities)[None, :, None] * length[:, None, None] + t
    node_ids = torch.where(valid[:, None, :], node_ids, torch.zeros_like(node_ids))
    edge_offset = utterance_offset + n_modalities * torch.arange(n_dialogues)
    modality_edge_ids = edge_offset[:, None] + torch.arange(n_modalities)
    utterance_edge_ids = torch.where(valid, edge_offset[:, None] + n_modalities + t, torch.zeros_like(valid, dtype=torch.long))
    degree = (length - 1 + n_modalities - 1).float()
    inv_sqrt = torch.where(degree > 0, degree.pow(-0.5), torch.zeros_like(degree))
    flat_valid = (torch.arange(n_dialogues)[:, None] * max_len + t)[valid]
    utterance_dialogue, utterance_position = flat_valid // max_len, flat_valid % max_len
    utterance_nodes = ((utterance_dialogue * n_modalities)[:, None] + torch.arange(n_modalities)) * max_len \
        + utterance_position[:, None]
    # Input step (t, b) equals step (min(t, n_b), b): padded steps share the first padded one.
    shared_step = torch.minimum(t[:, None], length[None, :]) * n_dialogues + torch.arange(n_dialogues)
    distinct_steps, step_rows = torch.unique(shared_step.reshape(-1), return_inverse=True)
    fields = dict(
        valid=valid, node_ids=node_ids, modality_edge_ids=modality_edge_ids, utterance_edge_ids=utterance_edge_ids,
        high_freq_norm=(inv_sqrt * inv_sqrt)[utterance_dialogue], flat_valid=flat_valid,
        utterance_steps=utterance_position * n_dialogues + utterance_dialogue,
        utterance_dialogue=utterance_dialogue,
        dialogue_members=(utterance_dialogue == torch.arange(n_dialogues)[:, None]).float(),
        utterance_node_ids=node_ids.transpose(1, 2).reshape(-1, n_modalities)[flat_valid],
        utterance_edges=utterance_edge_ids.reshape(-1)[flat_valid],
        utterance_nodes=utterance_nodes.reshape(-1),
        distinct_steps=distinct_steps, step_rows=step_rows.view(max_len, n_dialogues),
        other_real_sources=valid[:, None, None, :] & ~torch.eye(max_len, dtype=torch.bool),
        other_modalities=~torch.eye(n_modalities, dtype=torch.bool))
    return DialogueGraph(lengths=lengths, n_modalities=n_modalities, **_to_device(fields, device))


def _to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors on `device` in one copy per dtype, and no wait: each copy of a pageable tensor
    to a GPU waits for the GPU to finish all it was given, so a copy per field would stall
    every step; these go as one pinned buffer per dtype, asynchronously."""
    if device.type == "cpu":
        return tensors
    moved = {}
    for dtype in {t.dtype for t in tensors.values()}:
        names = [name for name, t in tensors.items() if t.dtype == dtype]
        packed = torch.cat([tensors[name].reshape(-1) for name in names])
        if device.type == "cuda":
            packed = packed.pin_memory()
        parts = packed.to(device, non_blocking=True).split([tensors[name].numel() for name in names])
        moved.update((name, part.view(tensors[name].shape)) for name, part in zip(names, parts))
    return moved


class HypergraphConv(nn.Module):
    r"""One hypergraph propagation step of M3Net (no feature transform: its weight is never read).

    .. math::
        m_e = B_e^{-1} \sum_{v \in e} x_v, \qquad
        x'_v = \mathrm{LeakyReLU}\Big(D_v^{-1} \sum_{e \ni v} m_e + b\Big)

    with positional weights :math:`w_e` = ``hyperedge_weight[e]`` and :math:`\omega_v` =
    ``node_weight[v]``, :math:`D_v = \sum_{e \ni v} w_e`, :math:`B_e = \sum_{v \in e} \omega_v`,
    1/0 := 0, LeakyReLU slope 0.01. Each node lies in exactly two hyperedges: its utterance's
    (the sum over the node list's modality axis) and its modality's in its dialogue (a sum over
    the dialogue's utterances: one product with the [B, N] membership matrix).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, graph: DialogueGraph,
                hyperedge_weight: torch.Tensor, node_weight: torch.Tensor) -> torch.Tensor:
        # A sum over a dialogue's utterances is a product with the 0/1 membership matrix (a
        # non-finite value would reach the other dialogues through its zeros; the loader
        # refuses non-finite features).
        members = graph.dialogue_members                                        # [B, N]
        omega = node_weight[graph.utterance_node_ids]                           # [N, M]
        w_modality = hyperedge_weight[graph.modality_edge_ids]                  # [B, M]
        w_utterance = hyperedge_weight[graph.utterance_edges]                   # [N]

        modality_sum = torch.matmul(members.to(x.dtype), x.flatten(-2)).unflatten(-1, x.shape[-2:])  # [..., B, M, H]
        modality_msg = modality_sum * _inverse_or_zero(members.to(omega.dtype) @ omega)[..., None]
        utterance_msg = x.sum(-2) * _inverse_or_zero(omega.sum(-1))[:, None]               # [..., N, H]
        inv_degree = _inverse_or_zero(w_modality[graph.utterance_dialogue] + w_utterance[:, None])   # [N, M]
        messages = modality_msg.index_select(-3, graph.utterance_dialogue).add_(utterance_msg[..., None, :])
        out = torch.addcmul(self.bias, messages, inv_degree[..., None])
        return F.leaky_relu(out, negative_slope=0.01, inplace=True)          # in place: one pass fewer


class HighFrequencyConv(nn.Module):
    r"""M3Net's gated high-frequency message passing (one residual branch layer).

    .. math::
        x'_t = \sum_{s \to t} \deg(s)^{-1/2} \deg(t)^{-1/2}
               \tanh\big(\mathrm{gate}([x_t \,;\, x_s])\big)\, x_s

    over the directed edges of a dialogue (distinct nodes of one modality; distinct nodes of
    one utterance). The gate is linear, so gate([x_t; x_s]) = a_t + c_s + bias: the [M, M]
    (within an utterance) and [T, T] (within a modality) gate matrices come from two
    projections, and the sums are batched matmuls, the latter over the padded block.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.gate = nn.Linear(2 * channels, 1)

    def scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate's halves per node, a_t (target) and c_s + bias (source): [..., N, M] each."""
        h = x.shape[-1]
        return (F.linear(x, self.gate.weight[:, :h]).squeeze(-1),
                F.linear(x, self.gate.weight[:, h:]).squeeze(-1) + self.gate.bias)

    def within_modality(self, x: torch.Tensor, graph: DialogueGraph,
                        scores: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The messages along the edges within a modality, before the degree norm: [..., N, M, H].
        A node reads its own modality's nodes alone. `scores`: `scores(x)`, if computed already."""
        target, source = self.scores(x) if scores is None else scores
        # gate[t, s] over a dialogue's utterances, padded sources (0 in the block) and self-loops
        # removed.
        block = graph.scatter_nodes(x)                                             # [..., B, M, T, H]
        target, source = graph.scatter_nodes(torch.stack([target, source], -1)).unbind(-1)   # [..., B, M, T]
        gate = torch.tanh(target[..., :, None] + source[..., None, :])            # [..., B, M, T, T]
        return graph.gather_nodes(torch.matmul(gate * graph.other_real_sources, block))

    def forward(self, x: torch.Tensor, graph: DialogueGraph,
                same_modality: torch.Tensor | None = None) -> torch.Tensor:
        """`same_modality`: `within_modality(x, graph)`, if the caller has it already."""
        target, source = self.scores(x)
        # Within an utterance: gate[m, m'] over its modalities, self-loops removed.
        gate = torch.tanh(target[..., :, None] + source[..., None, :])            # [..., N, M, M]
        same_utterance = torch.matmul(gate * graph.other_modalities, x)
        if same_modality is None:
            same_modality = self.within_modality(x, graph, (target, source))

        # In place: no new [..., N, M, H]. The result is a fresh tensor (not a view: in place on
        # a view autograd would copy) that no backward reads, so the caller may add its residual
        # into it in place too.
        return same_utterance.add_(same_modality).mul_(graph.high_freq_norm[:, None, None])
