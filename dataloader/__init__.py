"""IEMOCAP / MELD data: load and validate the public pickles, batch dialogues, make synthetic data.

    conversations = load_conversations("IEMOCAP", data_dir)
    loaders = make_loaders(conversations, batch_size=8, valid_frac=0.1, seed=1475)
    for batch in loaders["train"]: ...   # a Batch, sequence-first

The torch-based names (Batch, loaders) are imported on first use: importing torch takes
seconds, and `python -m dataloader` / `python -m dataloader.synthetic` never need it.
"""
from importlib import import_module

from .datasets import (DATASETS, Conversations, DataError, DatasetInfo, Dialogue, data_files,
                       load_conversations)

_LAZY = {"Batch": ".batch", "DialogueDataset": ".loaders", "collate": ".loaders",
         "make_loaders": ".loaders", "split_train_valid": ".loaders"}

__all__ = ["Batch", "Conversations", "DATASETS", "DataError", "DatasetInfo", "Dialogue",
           "DialogueDataset", "collate", "data_files", "load_conversations", "make_loaders",
           "split_train_valid"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
