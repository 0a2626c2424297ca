"""Draw training runs: plots, tables and linear probes into RUN_DIR/report/; see utils/training/report.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.training.report import main  # noqa: E402

if __name__ == "__main__":
    main()
