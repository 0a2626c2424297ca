"""M3Net, its conversation graph, and checkpoint I/O."""
from model.checkpoint import CheckpointError, load_model_state, read_checkpoint, save_atomic
from model.graph import DialogueGraph, GraphCapacityError, HighFrequencyConv, HypergraphConv, build_graph
from model.m3net import M3Net, ModelConfig, ModelOutput

__all__ = [
    "CheckpointError", "load_model_state", "read_checkpoint", "save_atomic",
    "DialogueGraph", "GraphCapacityError", "HighFrequencyConv", "HypergraphConv", "build_graph",
    "M3Net", "ModelConfig", "ModelOutput",
]
