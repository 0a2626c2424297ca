"""Train M3Net with DGS on IEMOCAP. Only the dataset's defaults live here; see utils/main.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.main import main  # noqa: E402

IEMOCAP_DEFAULTS = dict(
    seed=1475, base_model="GRU", dropout=0.5, lr=1e-4, batch_size=8, epochs=80, norm="BN",
    num_L=1, num_K=1, use_modal=True, modulation_ends=80, alpha_=0.6, pareto_gamma=0.2,
)

if __name__ == "__main__":
    main("IEMOCAP", IEMOCAP_DEFAULTS)
