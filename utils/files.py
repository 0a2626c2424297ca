"""Files written so that a kill at any instant leaves the old file or the new one, never half a
file, and never writes through a name that may be a hard link to a kept file; strict JSON."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temp_path(path: Path) -> Path:
    """The one temp name of `path` (fixed, so that what a killed run left is found and removed)."""
    return path.with_name(f".{path.name}.tmp")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp file beside `path` to write as a new file; renamed onto `path` when the block ends,
    removed if it raises: a crash never leaves half a file. The temp name is removed first: one a
    killed save left may be a hard link to a kept file (best.pt), which writing through it would
    overwrite."""
    path = Path(path)
    tmp = temp_path(path)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def json_text(obj: Any, **kwargs: Any) -> str:
    """`obj` as strict JSON, the one encoding of every JSON output: a float that is not finite
    (NaN, Inf, which strict JSON readers reject) is written as null."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(value) for value in obj]
    return obj


def equal_as_json(a: Any, b: Any) -> bool:
    """Whether `a` and `b` are written as the same JSON (a record read back from a JSON output
    against the one a checkpoint keeps)."""
    return json.loads(json_text(a)) == json.loads(json_text(b))


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        write_new(tmp, (json_text(obj, indent=1) + "\n").encode())


def write_new(path: Path, data: bytes) -> None:
    """Write `data` into a file created here (never through one that exists)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


def append_whole(fd: int, data: bytes) -> None:
    """Append `data` to the file open (O_APPEND) as `fd`, whole or not at all: what a failed write
    (a full disk) added is cut off again, so that the file keeps whole lines."""
    size = os.fstat(fd).st_size
    try:
        _write_all(fd, data)
    except BaseException:
        os.ftruncate(fd, size)
        raise


def _write_all(fd: int, data: bytes) -> None:
    """os.write until all of `data` is written (one call may write only part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
