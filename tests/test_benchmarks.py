"""The benchmarks run end to end on tiny data, and refuse bad input in one line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_bench_train_measures_both_configurations(tmp_path, meld_dir):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "MELD").symlink_to(meld_dir)
    out = tmp_path / "bench.json"
    done = _bench("bench_train.py", "--Dataset", "MELD", "--data-dir", str(tmp_path / "data"), "--steps", "2",
                  "--epochs", "1", "--profile-steps", "1", "--paired-rounds", "1", "--stall-seconds", "0", "--json", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    rows = {row["config"]: row for row in result["configurations"]}
    assert set(rows) == {"plain", "dgs"}
    for row in rows.values():
        assert row["device"] == "cpu" and len(row["step_times"]) == 2 and len(row["epoch_times"]) == 1
        assert row["step_s_median"] > 0 and row["epoch_s_median"] > 0 and row["peak_mem_mib"] > 0
    # DGS adds the valuation, a second backward and the shaping: more GFLOP, and phases of its own.
    assert 1.2 < rows["dgs"]["step_gflop"] / rows["plain"]["step_gflop"] < 2.5
    assert set(rows["dgs"]["breakdown_ms"]) == {"m3net.encoders", "m3net.graph", "dgs.valuation", "dgs.backward",
                                                "dgs.shaping", "dgs.optimizer"}
    assert "dgs.valuation" not in rows["plain"]["breakdown_ms"]
    assert len(result["paired"]) == 1 and len(result["paired"][0]["ratios"]) == 2
    assert "DGS / plain, paired steps on the same batches, MELD cpu" in done.stdout


@pytest.mark.parametrize("script,args,message", [
    ("bench_train.py", ["--device", "gpu0"], "error: --device gpu0: "),
    ("bench_shaping.py", ["--device", "gpu0"], "error: --device gpu0: "),
    ("profile_step.py", ["--data-dir", "/nonexistent"], "error: MELD data not found: missing /nonexistent/MELD/"),
])
def test_benchmarks_refuse_bad_input_in_one_line(script, args, message):
    done = _bench(script, "--Dataset", "MELD", *args)
    assert done.returncode == 2
    assert done.stderr.startswith(message) and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr
