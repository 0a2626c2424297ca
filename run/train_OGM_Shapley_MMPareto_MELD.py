"""Train M3Net with DGS on MELD. Only the dataset's defaults live here; see utils/main.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.main import main  # noqa: E402

MELD_DEFAULTS = dict(
    seed=67137, base_model="GRU", dropout=0.4, lr=1e-5, batch_size=8, epochs=50, norm="BN",
    num_L=1, num_K=1, use_modal=False, modulation_ends=50, alpha_=0.6, pareto_gamma=1.0,
)

if __name__ == "__main__":
    main("MELD", MELD_DEFAULTS)
