"""The benchmarks run (``python -m bench --smoke``): one tiny iteration each, so they cannot rot.

Nothing here times anything: speed is measured by ``python -m bench`` itself, as ratios against peers,
and recorded in bench/RESULTS.md.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("transformers", reason="the benchmarks' peers are Hugging Face models (dev extra)")


def _bench(tmp_path: Path, cache_dir: Path, *args: str) -> dict:
    out = tmp_path / "latest.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out), *args],
        cwd=ROOT,
        env={**os.environ, "LMEXP_CACHE_DIR": str(cache_dir)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "results:" in done.stdout
    return json.loads(out.read_text())


@pytest.mark.slow
def test_cpu_suite_runs_every_benchmark_once(tmp_path, cache_dir):
    report = _bench(tmp_path, cache_dir)
    assert report["smoke"] is True
    assert set(report["seconds"]) == {"model_step", "memory", "overhead", "startup", "data"}
    expected = {
        "model_step/gpt",
        "model_step/bert",
        "model_step/llama",
        "model_step/adamw",
        "memory/gpt",
        "overhead/full_path",
        "overhead/hf_full_path",
        "data/loader_wait",
        "startup/max_steps_1",
        "data/tokenizer_train",
        "data/tokenizer_encode",
    }
    if platform.libc_ver()[0] == "glibc":  # the child process with glibc's malloc tuned
        expected |= {f"model_step/{m}_malloc_tuned" for m in ("gpt", "bert", "llama")}
    assert set(report["results"]) == expected
    for name, result in report["results"].items():
        assert result["values"], name
        assert all(math.isfinite(v) for v in result["values"].values()), (name, result["values"])
        assert result["ratio"] is not None and result["ratio"] > 0, name
    startup = report["results"]["startup/max_steps_1"]["values"]
    phases = [k for k in startup if k.endswith("_sec") and k not in ("wall_sec", "phases_sum_sec")]
    assert {"imports_sec", "compose_sec", "data_sec", "first_step_sec"} <= set(phases)
    assert report["machine"]["torch"] and report["machine"]["host_cpus"] >= 1


@pytest.mark.slow
def test_gpu_check_script_runs_on_the_cpu_in_smoke_mode(tmp_path, cache_dir):
    # No GPU here: the device job's script with --smoke runs the same code (the full lmexp path under
    # bf16-mixed against the HF loop for gpt, llama and bert; FSDP on one rank with its sharded checkpoint
    # resumed and exported) on the CPU with tiny sizes, so device minutes are never spent on a typo.
    out = tmp_path / "gpu"
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--smoke", str(out)],
        env={**os.environ, "LMEXP_CACHE_DIR": str(cache_dir)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert set(report["results"]) == {"gpu/gpt", "gpu/llama", "gpu/bert", "gpu/fsdp"}
    for name in ("gpu/gpt", "gpu/llama", "gpu/bert"):
        values = report["results"][name]["values"]
        assert values["lmexp_tokens_per_sec"] > 0 and values["hf_tokens_per_sec"] > 0
    fsdp = report["results"]["gpu/fsdp"]["values"]
    assert fsdp["sharded_checkpoint"] == 1 and fsdp["exported"] == 1 and fsdp["resumed_to_step"] > 4
    assert "gpu_check:" in (out / "gpu_check.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "named"),
    [(["--only", "nope"], "--only"), (["--only", "model_step", "--override", "optim.nope=1"], "optim.nope")],
)
def test_bad_arguments_are_one_line(args, named, tmp_path):
    out = tmp_path / "latest.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out), *args],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("bench: ")]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith("error: ") and named in lines[0]
    assert "Traceback" not in done.stderr and not out.exists()
