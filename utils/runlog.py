"""Run outputs: the human log (stdout + train.log), metrics.jsonl, JSON files, TensorBoard."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from utils.errors import UserError


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


class RunLog:
    """Everything a run writes into its log dir, plus the flushed per-epoch line on stdout."""

    def __init__(self, log_dir: Path, tensorboard: bool = False):
        self.dir = log_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self._text = open(self.dir / "train.log", "a", buffering=1)
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self._writer = SummaryWriter(str(self.dir))

    def line(self, text: str) -> None:
        print(text, flush=True)
        self._text.write(text + "\n")

    def epoch(self, record: dict[str, Any]) -> None:
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in _flatten(record).items():
                if key != "epoch":
                    self._writer.add_scalar(key, value, record["epoch"])
            self._writer.flush()

    def close(self) -> None:
        self._text.close()
        if self._writer is not None:
            self._writer.close()


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        elif isinstance(value, (int, float)) and value is not None:
            flat[name] = value
    return flat
