"""Loading M3Net state_dicts and our own checkpoints; writing checkpoints atomically."""
from __future__ import annotations

import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from model.m3net import M3Net
from utils.errors import UserError, first_line
from utils.files import atomic_path

# Keys the M3Net checkpoint carries for modules its forward never reads.
IGNORED_KEY = re.compile(
    r"^(graph_model\.hyperconv\d+\.(weight|edgeweight|edgefc\..*)"
    r"|graph_model\.hyperedge_attr[12]|hidfc\..*)$")
HEAD_KEY = re.compile(r"^head_[avl]\.")


class CheckpointError(UserError):
    pass


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file: ours ({'model': state, ...}) or a raw M3Net state_dict.

    Returns a dict with at least 'model' (the state_dict); our own fields are kept as saved.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    kind = _torch_file_kind(path)
    if kind is None:
        raise CheckpointError(f"checkpoint {path}: not a PyTorch checkpoint (neither torch.save's zip "
                              f"format nor a pickle)")
    if kind == "zip":
        _check_zip_records(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, a pickle of arbitrary objects
        raise CheckpointError(f"checkpoint {path}: cannot be read ({first_line(e)})") from None
    if isinstance(payload, dict) and "model" in payload and isinstance(payload["model"], dict):
        return payload
    if isinstance(payload, dict) and all(isinstance(v, torch.Tensor) for v in payload.values()):
        state = {k.removeprefix("module."): v for k, v in payload.items()}   # also DataParallel saves
        return {"model": state}
    raise CheckpointError(f"checkpoint {path}: neither a state_dict nor a checkpoint of this project")


def _check_zip_records(path: Path) -> None:
    """torch's zip reader does not check the CRC-32 of each record, so a checkpoint with flipped
    bytes would load as wrong weights: check them here (a pickle-format one has none to check)."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except Exception as e:  # a truncated archive, a damaged directory or record header
        raise CheckpointError(f"checkpoint {path}: cannot be read ({first_line(e)})") from None
    if damaged is not None:
        raise CheckpointError(f"checkpoint {path}: damaged (the bytes of its record {damaged} do not match their "
                              f"CRC-32): it would load as wrong weights")


def _torch_file_kind(path: Path) -> str | None:
    """"zip" or "pickle": torch.save writes a zip archive (torch >= 1.6) or, in the legacy format,
    a pickle, whose first byte is the PROTO opcode 0x80; None for anything else."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        return "zip"
    return "pickle" if head[:1] == b"\x80" else None


def _flags_of_state(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """What a state_dict says about the flags it was trained with (only what its keys reveal)."""
    keys = " ".join(state)
    flags = {}
    # Absent keys tell a count only where the module holding them is there: a partial state_dict
    # (a classifier alone) says nothing about the graph's layers.
    if "graph_model." in keys:
        flags["--num_L"] = str(len(set(re.findall(r"graph_model\.hyperconv(\d+)\.bias", keys))))
        flags["--num_K"] = str(len(set(re.findall(r"graph_model\.conv(\d+)\.gate\.weight", keys))))
    for prefix, base in (("gru", "GRU"), ("lstm", "LSTM"), ("trans", "Transformer")):
        if f"{prefix}_l." in keys:
            flags["--base-model"] = base
    if re.search(r"linear_[av]\.", keys):
        flags["--av_using_lstm"] = "on" if re.search(r"(gru|lstm)_[av]\.", keys) else "off"
    if "smax_fc.weight" in state:
        flags["classes (--Dataset)"] = str(state["smax_fc.weight"].shape[0])
    if "graph_model.speaker_embeddings.weight" in state:
        flags["speakers (--Dataset)"] = str(state["graph_model.speaker_embeddings.weight"].shape[0])
    return flags


def _hint(state: dict[str, torch.Tensor], model: M3Net) -> str:
    """The flags whose values differ between the checkpoint and the model built from the command line."""
    ours, theirs = _flags_of_state(model.state_dict()), _flags_of_state(state)
    differ = [f"{k} {theirs[k]}" for k in theirs if k in ours and theirs[k] != ours[k]]
    if differ:
        return "the checkpoint needs " + ", ".join(differ)
    if not any(k.startswith("graph_model.") for k in state):
        return "it has no graph_model weights: a part of an M3Net state_dict, not a whole one"
    return "check --modals, --use_residue and --Dataset"


def load_model_state(model: M3Net, state: dict[str, torch.Tensor]) -> list[str]:
    """Load a state_dict into `model`; returns the parameters it left freshly initialised (the DGS heads).

    Keys M3Net carries but never reads are ignored; anything else that does not fit is a
    CheckpointError naming the keys and the flag that would fix it.
    """
    if not state:
        raise CheckpointError("checkpoint holds no weights (its state_dict is empty): it is not a trained model")
    own = model.state_dict()
    read = {k: v for k, v in state.items() if not IGNORED_KEY.match(k)}
    if not read:
        raise CheckpointError(f"checkpoint holds no weights M3Net reads: only keys its forward never reads "
                              f"({_first_keys(state)}): it is not a trained model")
    state = read
    odd = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise CheckpointError(f"checkpoint is not a state_dict: its entry {odd!r} is not a tensor "
                              f"({type(state[odd]).__name__})")
    if not set(state) & set(own):
        raise CheckpointError(f"checkpoint does not fit the model: none of its keys ({_first_keys(state)}) is one "
                              f"of M3Net's: it is not a checkpoint of this model")
    missing = [k for k in own if k not in state and not HEAD_KEY.match(k)]
    unexpected = [k for k in state if k not in own]
    misshapen = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                 for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
    if misshapen:
        problems.append(f"shape {', '.join(misshapen[:3])}")
    if problems:
        keys = "; ".join(problems)
        raise CheckpointError(f"checkpoint does not fit the model: {keys} ({_hint(state, model)})")
    fresh = [k for k in own if k not in state]
    model.load_state_dict(state, strict=False)
    return fresh


def _first_keys(state: dict[str, Any]) -> str:
    """The first three keys of a state_dict, for a message ("..." when there are more)."""
    return ", ".join(list(state)[:3]) + (" ..." if len(state) > 3 else "")


def save_atomic(obj: Any, path: str | Path, also: str | Path | None = None) -> None:
    """torch.save to a temp file in the same folder, then rename: a crash never leaves half a file.

    `also`: a second path that gets the same file (a hard link to the written file, so a checkpoint
    of 150 MB is written once; a copy where the file system has no links), renamed into place after
    `path`: a kill between the two renames leaves the old `also` and a `path` whose record says it
    is the best, from which --resume makes `also` again (link_atomic); in the other order the old
    `also` would be gone while `path` still names it the best.
    """
    if also is None:
        with atomic_path(path) as tmp:
            _save(obj, tmp)
        return
    with atomic_path(also) as also_tmp:
        with atomic_path(path) as tmp:
            _save(obj, tmp)
            _link(tmp, also_tmp)


def link_atomic(source: str | Path, path: str | Path) -> None:
    """Make `path` the file `source` is (a hard link; a copy where the file system has none), atomically."""
    with atomic_path(path) as tmp:
        _link(Path(source), tmp)


def _link(source: Path, new: Path) -> None:
    try:
        os.link(source, new)
    except OSError:
        shutil.copyfile(source, new)


def _save(obj: Any, path: Path) -> None:
    """torch.save, where a failed write raises its OSError (ENOSPC for a full disk): torch's own
    writer reports it as an opaque RuntimeError ("unexpected pos ...")."""
    with open(path, "xb") as file:             # a new file: never written through an existing one
        recording = _RecordingWriter(file)
        try:
            torch.save(obj, recording)
        except RuntimeError:
            if recording.error is None:
                raise
            raise recording.error from None


class _RecordingWriter:
    """A file torch.save writes through, keeping the OSError of a write that failed."""

    def __init__(self, file: BinaryIO):
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()
