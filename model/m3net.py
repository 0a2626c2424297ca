"""M3Net (CVPR 2023) with unimodal heads for DGS; parameter names match the public checkpoint.

Forward, per batch (README: "What a training step does", step 1):
  encode:  text layers -> norm -> mean of 4 -> linear_l (unless --no-text_linear) -> context RNN/Transformer;
           audio/visual -> linear (-> RNN)                       => z_m  [T, B, 1024]
  nodes:   real utterances' z_m, + speaker embedding (text), + modal embedding
                                                                  => [N, M, 1024]
  graph:   fc1 -> hypergraph branch and high-frequency branch    => per utterance [N, M·1024]
  head:    log_softmax(smax_fc(relu(dropout(h))))
Coalitions (modalities zeroed at the graph input) run through `fuse` as a leading dimension.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from dataloader.batch import Batch
from model.cuda_graphs import context_rnn
from model.dropout import apply_dropout
from model.graph import DialogueGraph, HighFrequencyConv, HypergraphConv, build_graph
from model.padding import distinct_rows, expand_rows, project_rows
from model.rnn import bidirectional_gru

TEXT_DIM = 1024      # RoBERTa feature size
NODE_DIM = 1024      # Dg: encoder output / graph input
HIDDEN_DIM = 512     # graph hidden size
NODE_ORDER = "lav"   # modality order of the nodes inside a dialogue
MODAL_EMBEDDING_ROW = {"a": 0, "v": 1, "l": 2}


# Bytes of node features one coalition pass may hold on the CPU. A pass of all 2^3 coalitions
# holds 8x the graph's activations at once, and there memory traffic, not arithmetic, sets the
# speed: each pass takes as many coalitions as keep its node list [K, N, M, 512] within this
# budget (docs/performance.md). Other devices take all coalitions in one pass.
PASS_BYTES = {"cpu": 6 * 2**20}


def coalitions_per_pass(n_coalitions: int, projected: torch.Tensor) -> int:
    """How many coalitions one graph pass takes, for the nodes' fc1 output `projected`."""
    budget = PASS_BYTES.get(projected.device.type)
    if budget is None:
        return n_coalitions
    return max(1, min(n_coalitions, budget // (projected.numel() * projected.element_size())))


@dataclass(frozen=True)
class ModelConfig:
    n_classes: int
    n_speakers: int
    audio_dim: int
    visual_dim: int
    modals: str = "avl"
    base_model: str = "GRU"
    norm: str = "BN"
    num_L: int = 1
    num_K: int = 1
    use_speaker: bool = True
    use_modal: bool = False
    use_residue: bool = False
    av_using_lstm: bool = False
    # linear_l between the averaged text and its context encoder: DGS's model has it on both
    # datasets, upstream M3Net's not on MELD (whose checkpoints carry it untrained).
    text_linear: bool = True
    dropout: float = 0.5

    @property
    def modalities(self) -> str:
        """Present modalities in node order (l, a, v)."""
        return "".join(m for m in NODE_ORDER if m in self.modals)


@dataclass
class ModelOutput:
    log_probs: torch.Tensor            # [N, C] multimodal
    unimodal_logits: dict              # modality -> [N, C]
    encoded: dict                      # modality -> z_m [T, B, 1024]
    nodes: torch.Tensor                # [N, M, 1024] graph input: each real utterance's nodes
    projected: torch.Tensor            # [N, M, 512] their fc1
    graph: DialogueGraph


def _context_rnn(kind: str, dropout: float) -> nn.Module:
    rnn = nn.GRU if kind == "GRU" else nn.LSTM
    return rnn(NODE_DIM, NODE_DIM // 2, num_layers=2, bidirectional=True, dropout=dropout)


class GraphModel(nn.Module):
    """`graph_model.*` of the checkpoint: embeddings, fc1, and both graph branches."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.modal_embeddings = nn.Embedding(3, NODE_DIM)
        # Embedding row of each present modality; a buffer so that it moves with the model
        # (building it per batch would be a blocking host-to-device copy).
        self.register_buffer("modal_rows", torch.tensor([MODAL_EMBEDDING_ROW[m] for m in cfg.modalities]),
                             persistent=False)
        self.speaker_embeddings = nn.Embedding(cfg.n_speakers, NODE_DIM)
        self.fc1 = nn.Linear(NODE_DIM, HIDDEN_DIM)
        for i in range(1, cfg.num_L + 1):
            setattr(self, f"hyperconv{i}", HypergraphConv(HIDDEN_DIM))
        self.hyperedge_weight = nn.Parameter(torch.ones(1000))
        self.EW_weight = nn.Parameter(torch.ones(5200))
        for k in range(1, cfg.num_K + 1):
            setattr(self, f"conv{k}", HighFrequencyConv(HIDDEN_DIM))

    def nodes(self, encoded: list[torch.Tensor], speakers: torch.Tensor) -> torch.Tensor:
        """Encoder outputs of the real utterances [N, D] per modality (node order), their speakers
        [N] -> graph input [N, M, D] with the speaker (text nodes) and modal embeddings added."""
        mods = self.cfg.modalities
        if self.cfg.use_speaker and "l" in mods:
            text_row = mods.index("l")
            encoded = [z + self.speaker_embeddings(speakers) if i == text_row else z for i, z in enumerate(encoded)]
        nodes = torch.stack(encoded, dim=1)
        if self.cfg.use_modal:
            nodes = nodes + self.modal_embeddings(self.modal_rows)
        return nodes

    def presence_messages(self, projected: torch.Tensor, graph: DialogueGraph) -> torch.Tensor | None:
        """The first high-frequency layer's messages within a modality, for every modality absent
        (its nodes fc1's bias) and present (their fc1 output `projected`): [2, N, M, H]; None
        without that layer. They read one modality alone, so each coalition's are a choice
        between these two: computed once, not once per coalition."""
        if not self.cfg.num_K:
            return None
        return self.conv1.within_modality(torch.stack([self.fc1.bias.expand_as(projected), projected]), graph)

    def forward(self, nodes: torch.Tensor, graph: DialogueGraph, coalitions: torch.Tensor | None = None,
                projected: torch.Tensor | None = None, presence_messages: torch.Tensor | None = None
                ) -> torch.Tensor:
        """nodes [N, M, D] -> per-utterance features [N, M·F] (or [K, N, M·F] for coalitions [K, M]).

        `projected`: `fc1(nodes)`, and `presence_messages`: `presence_messages(projected, graph)`,
        when the caller has them already (the coalition passes of a step share them).
        """
        x = self.fc1(nodes) if projected is None else projected
        same_modality = None
        if coalitions is not None:
            # fc1 of a zeroed node is its bias: mask after the projection instead of projecting K times.
            present = coalitions[:, None, :, None]
            if self.cfg.num_K:
                messages = self.presence_messages(x, graph) if presence_messages is None else presence_messages
                same_modality = torch.where(present, messages[1], messages[0])
            x = torch.where(present, x, self.fc1.bias)
            if self.cfg.use_residue:
                nodes = nodes * present
        hyper = x
        for i in range(1, self.cfg.num_L + 1):
            hyper = getattr(self, f"hyperconv{i}")(hyper, graph, self.hyperedge_weight, self.EW_weight)
        high = x
        for k in range(1, self.cfg.num_K + 1):
            high = getattr(self, f"conv{k}")(high, graph, same_modality if k == 1 else None).add_(high)
        parts = [hyper, high]
        if self.cfg.use_residue:
            parts.insert(0, nodes)
        # Per utterance, per modality, the parts side by side: [..., N, M·F].
        return torch.cat(parts, dim=-1).flatten(-2)


class M3Net(nn.Module):
    """M3Net's encoders, conversation graph and classifier, plus the unimodal heads head_m(z_m)
    that DGS trains beside it; the coalition pass of the Shapley valuation reuses the encodings."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # On the GPU, train from CUDA graphs (--no-cuda-graphs): the context RNNs here, and the
        # DGS step's gradient shaping (utils/dgs/shaping_graph.py).
        self.cuda_graphs = True
        # Module-name prefix of the text RNN (None: Transformer). --av_using_lstm: audio/visual
        # RNNs of the base model's kind; an LSTM beside a Transformer.
        self._text_rnn = {"GRU": "gru", "LSTM": "lstm"}.get(cfg.base_model)
        self._av_rnn = "gru" if cfg.base_model == "GRU" else "lstm"
        for suffix in "abcd":
            setattr(self, f"normBN{suffix}", nn.BatchNorm1d(TEXT_DIM))
            setattr(self, f"normLN{suffix}", nn.LayerNorm(TEXT_DIM))
        mods = cfg.modalities
        if "a" in mods:
            self.linear_a = nn.Linear(cfg.audio_dim, NODE_DIM)
        if "v" in mods:
            self.linear_v = nn.Linear(cfg.visual_dim, NODE_DIM)
        if "l" in mods:
            self.linear_l = nn.Linear(TEXT_DIM, NODE_DIM)
            if not cfg.text_linear:
                # Kept so that a checkpoint loads and saves as it is; nothing reads it, so nothing trains it.
                self.linear_l.requires_grad_(False)
            if self._text_rnn:
                setattr(self, f"{self._text_rnn}_l", _context_rnn(cfg.base_model, cfg.dropout))
            else:
                self.trans_l = nn.TransformerEncoderLayer(d_model=NODE_DIM, nhead=4)
        if cfg.av_using_lstm:
            for m in "av":
                if m in mods:
                    setattr(self, f"{self._av_rnn}_{m}", _context_rnn(self._av_rnn.upper(), cfg.dropout))
        self.graph_model = GraphModel(cfg)
        width = (NODE_DIM + 2 * HIDDEN_DIM if cfg.use_residue else 2 * HIDDEN_DIM) * len(mods)
        self.smax_fc = nn.Linear(width, cfg.n_classes)
        for m in mods:
            setattr(self, f"head_{m}", nn.Linear(NODE_DIM, cfg.n_classes))

    # ----------------------------------------------------------------- encoders
    def _normalise_text(self, layers: torch.Tensor) -> torch.Tensor:
        """layers [4, T, B, 1024] -> their mean after --norm (BN/LN per position, LN2 per dialogue)."""
        norm = self.cfg.norm
        normed = []
        for layer, suffix in zip(layers, "abcd"):
            if norm == "BN":
                # Statistics over all T·B positions, padding included, as the reference does.
                layer = getattr(self, f"normBN{suffix}")(layer.reshape(-1, TEXT_DIM)).view_as(layer)
            elif norm == "LN":
                layer = getattr(self, f"normLN{suffix}")(layer)
            elif norm == "LN2":
                layer = F.layer_norm(layer.transpose(0, 1), layer.shape[::2]).transpose(0, 1)
            normed.append(layer)
        r1, r2, r3, r4 = normed
        return (r1 + r2 + r3 + r4) / 4

    def _context(self, name: str, input_layer: nn.Linear | None, x: torch.Tensor, graph: DialogueGraph
                 ) -> torch.Tensor:
        """input_layer (None: none), then the context encoder `name`, over the padded sequence
        x [T, B, D] (no packing, as the reference): [T, B, D'].

        A dialogue's padded steps share one input row (model/padding.py), so the input layer runs
        once per distinct row.
        """
        encoder = getattr(self, name)
        if isinstance(encoder, nn.GRU) and x.device.type == "cpu":
            # Same function, with a backward that is several times faster than nn.GRU's on the CPU
            # (model/rnn.py); cuDNN's fused GRU is the faster one on the GPU. It too projects each
            # distinct row once, and as encoder outputs at padded steps are never read, its last
            # forward direction skips them.
            rows = distinct_rows(x, graph.distinct_steps)
            rows = rows if input_layer is None else input_layer(rows)
            return bidirectional_gru(encoder, rows, graph.utterance_steps, graph.step_rows)
        if input_layer is not None:
            x = expand_rows(input_layer(distinct_rows(x, graph.distinct_steps)), graph.step_rows)
        if isinstance(encoder, nn.TransformerEncoderLayer):
            return encoder(x)
        # On the GPU, one launch each way instead of cuDNN's per-step kernels (model/cuda_graphs.py).
        return context_rnn(encoder, x, self.cuda_graphs)

    def encode(self, batch: Batch, graph: DialogueGraph) -> dict[str, torch.Tensor]:
        """Encoder outputs z_m [T, B, 1024] per present modality (the gradient groups θ_m end here)."""
        encoded = {}
        for m in self.cfg.modalities:
            if m == "l":
                z = self._context(f"{self._text_rnn}_l" if self._text_rnn else "trans_l",
                                  self.linear_l if self.cfg.text_linear else None,
                                  self._normalise_text(batch.text), graph)
            elif self.cfg.av_using_lstm:
                # The RNN reads the padded steps too (as in the reference).
                z = self._context(f"{self._av_rnn}_{m}", getattr(self, f"linear_{m}"),
                                  batch.audio if m == "a" else batch.visual, graph)
            else:
                # Real utterances only: what the reference computes at padding (the bias) never
                # reaches a prediction.
                features = batch.audio if m == "a" else batch.visual
                z = project_rows(getattr(self, f"linear_{m}"), features, graph.utterance_steps)
            encoded[m] = z
        return encoded

    def encoder_groups(self) -> dict[str, list[nn.Parameter]]:
        """θ_m: the parameters each modality's encoder owns (what OGM and MMPareto act on);
        without --text_linear, linear_l is no part of the text encoder."""
        groups = {}
        for m in self.cfg.modalities:
            names = [f"linear_{m}"] if m != "l" or self.cfg.text_linear else []
            names += [f"gru_{m}", f"lstm_{m}", f"trans_{m}"]
            if m == "l":
                names += [f"norm{kind}{s}" for kind in ("BN", "LN") for s in "abcd"
                          if self.cfg.norm == kind]
            groups[m] = [p for n in names if hasattr(self, n) for p in getattr(self, n).parameters()]
        return groups

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.cfg.modalities for p in getattr(self, f"head_{m}").parameters()]

    # ----------------------------------------------------------------- fusion
    def graph_nodes(self, utterances: dict[str, torch.Tensor], batch: Batch, graph: DialogueGraph) -> torch.Tensor:
        """Encoder outputs of the real utterances ([N, 1024] per modality) -> graph input
        [N, M, 1024] with speaker / modal embeddings."""
        speakers = graph.gather_utterances(batch.qmask.argmax(-1))                   # [N]
        return self.graph_model.nodes([utterances[m] for m in self.cfg.modalities], speakers)

    def fuse(self, nodes: torch.Tensor, graph: DialogueGraph, coalitions: torch.Tensor | None = None,
             dropout: bool = True, projected: torch.Tensor | None = None,
             presence_messages: torch.Tensor | None = None) -> torch.Tensor:
        """Graph + classifier: log-probs [N, C], or [K, N, C] with modalities outside each coalition
        zeroed. `projected`, `presence_messages`: as `GraphModel.forward` takes them."""
        h = self.graph_model(nodes, graph, coalitions, projected, presence_messages)
        if dropout:
            h = apply_dropout(h, self.cfg.dropout, self.training)
        return F.log_softmax(self.smax_fc(F.relu(h)), dim=-1)

    @torch.no_grad()
    def coalition_log_probs(self, out: ModelOutput, coalitions: torch.Tensor) -> torch.Tensor:
        """The multimodal log-probs of every coalition [K, M] (bool, columns in `cfg.modalities`
        order): modalities outside a coalition zeroed at the graph input, no dropout, the encoder
        outputs of `out` reused: [K, N, C]. Coalitions run as a leading dimension, in as few graph
        passes as `coalitions_per_pass` allows."""
        nodes, projected = out.nodes.detach(), out.projected.detach()
        messages = self.graph_model.presence_messages(projected, out.graph)
        per_pass = coalitions_per_pass(len(coalitions), projected)
        return torch.cat([self.fuse(nodes, out.graph, chunk, dropout=False, projected=projected,
                                    presence_messages=messages)
                          for chunk in coalitions.split(per_pass)])

    @staticmethod
    def _real_utterances(encoded: dict[str, torch.Tensor], graph: DialogueGraph) -> dict[str, torch.Tensor]:
        """Encoder outputs [T, B, 1024] -> those of the real utterances, [N, 1024]."""
        return {m: graph.gather_utterances(z) for m, z in encoded.items()}

    def graph_for(self, batch: Batch) -> DialogueGraph:
        return build_graph(tuple(batch.lengths.tolist()), len(self.cfg.modalities), batch.umask.device)

    def forward(self, batch: Batch) -> ModelOutput:
        """The multimodal log-probabilities of the batch's utterances [N, C], with the encodings
        z_m and the unimodal logits that the DGS step needs."""
        graph = self.graph_for(batch)
        with record_function("m3net.encoders"):
            encoded = self.encode(batch, graph)
        with record_function("m3net.graph"):
            nodes = self.graph_nodes(self._real_utterances(encoded, graph), batch, graph)
            projected = self.graph_model.fc1(nodes)
            log_probs = self.fuse(nodes, graph, projected=projected)
        # Gathered apart from the graph's: a DGS step's first backward pass frees what it goes
        # through down to the encoder outputs, and the heads' pass comes after it.
        return ModelOutput(log_probs, self.unimodal_logits(encoded, graph), encoded, nodes, projected, graph)

    def unimodal_logits(self, encoded: dict[str, torch.Tensor], graph: DialogueGraph,
                        detach: bool = False) -> dict[str, torch.Tensor]:
        """head_m(z_m) of the real utterances, [N, C] per modality; `detach`: heads fitted on the
        encoder outputs without a gradient reaching the encoders."""
        return {m: getattr(self, f"head_{m}")(z.detach() if detach else z)
                for m, z in self._real_utterances(encoded, graph).items()}
