"""Run outputs: the human log (stdout + train.log), metrics.jsonl, JSON files, TensorBoard."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any, TextIO

from utils.errors import UserError, stdout_gone
from utils.files import append_whole, atomic_path, json_text, temp_path, write_new

try:
    import fcntl
except ImportError:          # Windows: there a second run in the same folder is not refused
    fcntl = None

METRICS_FILE = "metrics.jsonl"   # one JSON record per epoch
# The files a run writes through atomic_path, whose temp files a killed run may leave behind.
ATOMIC_FILES = ("last.pt", "best.pt", METRICS_FILE, "summary.json", "test_metrics.json")


def read_records(path: Path, last_epoch: int) -> dict[int, dict[str, Any]]:
    """metrics.jsonl's records by epoch, up to the one of `last_epoch`: the lines after it (epochs
    logged after last.pt was written, a record that a kill cut short) are not read."""
    records = {}
    with open(path) as file:
        for number, line in enumerate(file, 1):
            record = _record_of(line)
            if record is None:
                raise UserError(f"{path}: line {number} is not a record of an epoch")
            records[record["epoch"]] = record
            if record["epoch"] == last_epoch:
                break
    return records


def _record_of(line: str) -> dict[str, Any] | None:
    """The epoch record on a line of metrics.jsonl; None if it holds none."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("epoch"), int) else None


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
            self._text = _append_to(self.dir / "train.log", "ab", buffering=0)
        except UserError:
            self._lock.close()
            if not had_lock:                         # a failed start leaves the folder as it found it
                (self.dir / ".lock").unlink()
            raise
        _remove_stale_temp_files(self.dir)
        self._writer = summary_writer(str(self.dir)) if summary_writer else None
        self._stdout = True

    @property
    def metrics_path(self) -> Path:
        return self.dir / METRICS_FILE

    @property
    def text_path(self) -> Path:
        return self.dir / "train.log"

    def line(self, text: str) -> None:
        try:
            append_whole(self._text.fileno(), (text + "\n").encode())
        except OSError as e:
            raise UserError(f"cannot write {self.text_path} ({e.strerror})") from None
        if self._stdout:
            try:
                print(text, flush=True)
            except BrokenPipeError:          # the run goes on, into train.log alone
                self._stdout = False
                stdout_gone()

    def ended(self, text: str) -> None:
        """The line a run ends on when it fails or is interrupted: into train.log alone (the entry
        point prints it on stderr), so that the log says how the run ended. Where even that line
        cannot be written (the full disk that stopped the run), stderr alone has it."""
        try:
            append_whole(self._text.fileno(), (text + "\n").encode())
        except OSError:
            pass

    def epoch(self, record: dict[str, Any]) -> None:
        """Append the epoch's record to metrics.jsonl; an OSError (a full disk) leaves the file as it was."""
        fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            append_whole(fd, (json_text(record) + "\n").encode())
        finally:
            os.close(fd)
        if self._writer is not None:
            for key, value in _flatten(record).items():
                if key != "epoch":
                    self._writer.add_scalar(key, value, record["epoch"])
            self._writer.flush()

    def drop_epochs_after(self, epoch: int) -> None:
        """Forget the lines of metrics.jsonl after the record of `epoch` (epochs logged before a
        crash that lost their checkpoint, a record that a kill cut short)."""
        lines = self.metrics_path.read_text().splitlines(keepends=True)
        kept = []
        for line in lines:
            kept.append(line)
            record = _record_of(line)
            if record is not None and record["epoch"] == epoch:
                break
        if len(kept) != len(lines):
            with atomic_path(self.metrics_path) as tmp:
                write_new(tmp, "".join(kept).encode())

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


def _append_to(path: Path, mode: str = "a", buffering: int = -1) -> IO:
    """`path` (in the log dir) opened for appending; a UserError naming the folder if it cannot be."""
    try:
        return open(path, mode, buffering=buffering)
    except OSError as e:
        raise UserError(f"--log-dir {path.parent}: cannot write in it ({e.strerror})") from None


def _remove_stale_temp_files(folder: Path) -> None:
    """Remove the temp files a killed run left (half a checkpoint, a hard link to best.pt), so that
    a finished run leaves none. Files only: anything else there fails the write that needs the
    name, with a line naming it."""
    for name in ATOMIC_FILES:
        stale = temp_path(folder / name)
        if stale.is_symlink() or stale.is_file():
            stale.unlink(missing_ok=True)


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
        name = f"{prefix}{key or 'none'}"      # "" names the empty coalition
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        elif isinstance(value, (int, float)) and value is not None:
            flat[name] = value
    return flat
