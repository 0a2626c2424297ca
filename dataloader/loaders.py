"""Dialogue datasets, the collate function and the split -> DataLoader factory."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .batch import Batch
from .datasets import TEXT_LAYERS, Conversations, Dialogue


class DialogueDataset(Dataset):
    """A list of dialogues; one item is one whole dialogue."""

    def __init__(self, dialogues: Sequence[Dialogue]):
        self.dialogues = list(dialogues)

    def __len__(self) -> int:
        return len(self.dialogues)

    def __getitem__(self, index: int) -> Dialogue:
        return self.dialogues[index]


def collate(records: Sequence[Dialogue]) -> Batch:
    """Pad dialogues (kept in the given order) into one sequence-first Batch, zeros at padding."""
    lengths = np.array([len(r) for r in records], dtype=np.int64)
    steps, width = int(lengths.max()), len(records)
    first = records[0]
    text = np.zeros((TEXT_LAYERS, steps, width, first.text.shape[2]), np.float32)
    audio = np.zeros((steps, width, first.audio.shape[1]), np.float32)
    visual = np.zeros((steps, width, first.visual.shape[1]), np.float32)
    qmask = np.zeros((steps, width, first.n_speakers), np.float32)
    umask = np.zeros((width, steps), np.float32)
    labels = np.zeros((width, steps), np.int64)
    for b, r in enumerate(records):
        n = len(r)
        text[:, :n, b] = r.text.transpose(1, 0, 2)
        audio[:n, b] = r.audio
        visual[:n, b] = r.visual
        qmask[np.arange(n), b, r.speakers] = 1.0
        umask[b, :n] = 1.0
        labels[b, :n] = r.labels
    return Batch(text=torch.from_numpy(text), audio=torch.from_numpy(audio),
                 visual=torch.from_numpy(visual), qmask=torch.from_numpy(qmask),
                 umask=torch.from_numpy(umask), labels=torch.from_numpy(labels),
                 lengths=torch.from_numpy(lengths), ids=[r.id for r in records])


def split_train_valid(conversations: Conversations, valid_frac: float,
                      seed: int) -> Conversations:
    """Hold out round(valid_frac * n_train) train dialogues (at least one) as split 'valid'.

    Which dialogues go is a seeded random draw; both parts keep file order. valid_frac = 0
    returns the conversations unchanged.
    """
    if not 0.0 <= valid_frac < 1.0:
        raise ValueError(f"the validation fraction must be in [0, 1), got {valid_frac}")
    if valid_frac == 0.0:
        return conversations
    if "valid" in conversations.splits:
        raise ValueError("these conversations already have a 'valid' split")
    train = conversations.splits["train"]
    n_valid = max(1, round(valid_frac * len(train)))
    if n_valid >= len(train):
        raise ValueError(f"cannot hold out {n_valid} of {len(train)} train dialogues for "
                         f"validation: lower the validation fraction")
    held = set(np.random.default_rng(seed).permutation(len(train))[:n_valid].tolist())
    splits = dict(conversations.splits)
    splits["train"] = [d for i, d in enumerate(train) if i not in held]
    splits["valid"] = [d for i, d in enumerate(train) if i in held]
    # Keep the conventional split order train, valid, test for whoever iterates the dict.
    return conversations.with_splits({name: splits[name] for name in ("train", "valid", "test")
                                      if name in splits})


def make_loaders(conversations: Conversations, batch_size: int, valid_frac: float = 0.0,
                 seed: int = 0, shuffle_train: bool = True, num_workers: int = 0,
                 pin_memory: bool = False) -> dict[str, DataLoader]:
    """One DataLoader per split ('train', optionally 'valid', 'test') yielding Batch objects.

    Only 'train' is shuffled, by a generator seeded with `seed`, so a run is reproducible;
    'valid' and 'test' keep file order.
    """
    conversations = split_train_valid(conversations, valid_frac, seed)
    loaders = {}
    for name, dialogues in conversations.splits.items():
        shuffle = shuffle_train and name == "train"
        loaders[name] = DataLoader(
            DialogueDataset(dialogues), batch_size=batch_size, shuffle=shuffle,
            generator=torch.Generator().manual_seed(seed) if shuffle else None,
            collate_fn=collate, num_workers=num_workers, pin_memory=pin_memory)
    return loaders
