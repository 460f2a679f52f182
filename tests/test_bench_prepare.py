"""The preparation benchmark runs (``python -m bench --smoke --only prepare``): tiny sizes, nothing timed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("datasets", reason="the peer is Hugging Face datasets")


@pytest.mark.slow
def test_prepare_benchmark_runs_every_measurement(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--only", "prepare", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    expected = {"throughput", "peak_memory", "scaling", "peak_by_size", "processes"}
    assert set(results) == {f"prepare/{name}" for name in expected}
    for name, result in results.items():
        assert result["ratio"] > 0 and all(math.isfinite(v) for v in result["values"].values()), name
    memory = results["prepare/peak_memory"]["values"]
    assert 0 < memory["lmexp_peak_rss_mib"] < memory["peer_peak_rss_mib"]
