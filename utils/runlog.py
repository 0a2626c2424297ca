"""Run outputs: the human log (stdout + train.log), metrics.jsonl, JSON files, TensorBoard."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from utils.errors import UserError, stdout_gone

try:
    import fcntl
except ImportError:          # Windows: there a second run in the same folder is not refused
    fcntl = None

METRICS_FILE = "metrics.jsonl"   # one JSON record per epoch


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp file beside `path` to write; renamed onto `path` when the block ends, removed if it
    raises: a crash never leaves half a file. One fixed temp name per file, so what a killed
    process left behind is replaced by the next save rather than piling up."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")


class RunLog:
    """Everything a run writes into its log dir, plus the flushed per-epoch line on stdout.

    `fresh`: log_dir is a default name no other run may share (two runs started in the same
    second): if it exists, -2, -3, ... is appended.
    """

    def __init__(self, log_dir: Path, tensorboard: bool = False, fresh: bool = False):
        summary_writer = _summary_writer_class() if tensorboard else None
        self.dir = _make_dir(log_dir, fresh)
        had_lock = (self.dir / ".lock").exists()
        self._lock = _lock_dir(self.dir)
        try:
            self._text = _append_to(self.dir / "train.log", buffering=1)
        except UserError:
            self._lock.close()
            if not had_lock:                         # a failed start leaves the folder as it found it
                (self.dir / ".lock").unlink()
            raise
        self._writer = summary_writer(str(self.dir)) if summary_writer else None
        self._stdout = True

    @property
    def metrics_path(self) -> Path:
        return self.dir / METRICS_FILE

    def line(self, text: str) -> None:
        self._text.write(text + "\n")
        if self._stdout:
            try:
                print(text, flush=True)
            except BrokenPipeError:          # the run goes on, into train.log alone
                self._stdout = False
                stdout_gone()

    def ended(self, text: str) -> None:
        """The line a run ends on when it fails or is interrupted: into train.log alone (the entry
        point prints it on stderr), so that the log says how the run ended."""
        self._text.write(text + "\n")

    def epoch(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in _flatten(record).items():
                if key != "epoch":
                    self._writer.add_scalar(key, value, record["epoch"])
            self._writer.flush()

    def drop_epochs_after(self, epoch: int) -> None:
        """Forget metrics.jsonl records past `epoch` (written before a crash that lost their checkpoint)."""
        if not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line)["epoch"] <= epoch]
        if len(kept) != len(lines):
            with atomic_path(self.metrics_path) as tmp:
                tmp.write_text("".join(kept))

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._text.close()
        self._lock.close()
        if self._writer is not None:
            self._writer.close()


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def _make_dir(path: Path, fresh: bool) -> Path:
    candidate, n = path, 1
    while True:
        try:
            candidate.mkdir(parents=True, exist_ok=not fresh)
            return candidate
        except FileExistsError:
            if not fresh or not candidate.is_dir():
                raise UserError(f"--log-dir {candidate}: exists and is not a folder") from None
            n += 1
            candidate = path.with_name(f"{path.name}-{n}")
        except OSError as e:
            raise UserError(f"--log-dir {candidate}: cannot create it ({e.strerror})") from None


def _append_to(path: Path, buffering: int = -1) -> TextIO:
    """`path` (in the log dir) opened for appending; a UserError naming the folder if it cannot be."""
    try:
        return open(path, "a", buffering=buffering)
    except OSError as e:
        raise UserError(f"--log-dir {path.parent}: cannot write in it ({e.strerror})") from None


def check_not_in_use(folder: Path) -> None:
    """Refuse a folder whose .lock a live run holds: before anything judges the run in it by its
    files (a run in its first epoch has no last.pt yet, and is not a run that stopped)."""
    if fcntl is not None and (folder / ".lock").is_file():
        _lock_dir(folder).close()


def _lock_dir(folder: Path) -> TextIO:
    """Hold an exclusive lock on folder/.lock while the run lives (the OS drops it when the process
    ends, however it ends): a second run writing into the same folder is refused."""
    handle = _append_to(folder / ".lock")
    if fcntl is not None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise UserError(f"--log-dir {folder} is in use by another run that is still going: "
                            f"wait for it to end, or pick another folder") from None
    return handle


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        elif isinstance(value, (int, float)) and value is not None:
            flat[name] = value
    return flat
