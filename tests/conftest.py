"""Shared fixtures: tiny synthetic IEMOCAP and MELD folders, generated once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

from dataloader.synthetic import generate

# Small enough for a 2-core CI box, large enough for batches with padding:
# IEMOCAP 12 train / 3 test dialogues, MELD 12 train / 3 test dialogues.
IEMOCAP_SCALE = 0.1
MELD_SCALE = 0.01


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes tens of seconds on a 2-core box "
                                       "(deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def iemocap_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder containing IEMOCAP_features/ (synthetic, seed 0)."""
    root = tmp_path_factory.mktemp("iemocap")
    generate("IEMOCAP", root, scale=IEMOCAP_SCALE, seed=0)
    return root


@pytest.fixture(scope="session")
def meld_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder containing MELD_features/ (synthetic, seed 0)."""
    root = tmp_path_factory.mktemp("meld")
    generate("MELD", root, scale=MELD_SCALE, seed=0)
    return root
