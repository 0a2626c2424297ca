"""Methods × seeds (× a grid) of training runs, locally or on Ray, into tables; see utils/training/sweep.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.training.sweep import main  # noqa: E402

if __name__ == "__main__":
    main()
