"""Train M3Net with DGS on MELD: its defaults are on its dataset description
(dataloader/datasets.py: DATASETS); see utils/training/main.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataloader.datasets import DATASETS  # noqa: E402
from utils.training.main import main  # noqa: E402

MELD_DEFAULTS = DATASETS["MELD"].train_defaults

if __name__ == "__main__":
    main("MELD", MELD_DEFAULTS)
