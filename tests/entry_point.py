"""A training script's entry point run in-process, as the tests call it."""
from __future__ import annotations

from typing import Any

from utils.training import main as entry


def run_entry(capsys, dataset: str, defaults: dict[str, Any], argv: list[str]) -> tuple[int, str, str]:
    """entry.main(dataset, defaults, argv); returns (exit status, stdout, stderr)."""
    status = 0
    try:
        entry.main(dataset, defaults, argv)
    except SystemExit as e:
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err
