"""FLOPs per token, device peaks and MFU, and the perf/* figures of real runs (bf16-mixed, compile)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

import lmexp.training.callbacks
from lmexp.models.gpt import GPTConfig
from lmexp.models.lstm import LSTMConfig
from lmexp.train import train
from lmexp.training.perf import (
    chip_of,
    device_peak_flops,
    flops_per_token,
    matmul_parameters,
    mfu,
    peak_flops,
)

TFLOPS = 1e12


def test_flops_per_token_matches_a_hand_count():
    config = GPTConfig(n_layer=2, n_head=2, n_embd=16, max_seq_len=8, vocab_size=64, pad_vocab_to_multiple=64)
    C, V, L, T = 16, 64, 2, 8
    block = (
        2 * C  # ln1 weight + bias
        + (C * 3 * C + 3 * C)  # qkv
        + (C * C + C)  # attention output projection
        + 2 * C  # ln2
        + (C * 4 * C + 4 * C)  # MLP up
        + (4 * C * C + C)  # MLP down
    )
    lm_head = V * C  # tied to the token embedding, but a matmul: counted once, here
    n_matmul = L * block + 2 * C + lm_head  # + ln_f; embedding lookups are no matmul
    assert n_matmul == 7616
    attention = 2 * 2 * T * C * L * 3  # QK^T and PV, forward + backward (x3), over all T positions
    assert flops_per_token(config, T) == 6 * n_matmul + attention == 48768
    model = config.build()
    assert matmul_parameters(model) == n_matmul
    assert flops_per_token(config, T, model=model) == 48768
    assert flops_per_token(config, 4) == 6 * n_matmul + attention // 2  # attention grows with T


def test_recurrent_model_has_no_attention_term():
    config = LSTMConfig(vocab_size=64)
    model = config.build()
    assert flops_per_token(config, 128) == flops_per_token(config, 8) == 6 * matmul_parameters(model)


@pytest.mark.parametrize(
    ("device_name", "chip"),
    [
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA H100 NVL", "h100-nvl"),
        ("NVIDIA H200", "h200-sxm"),
        ("NVIDIA H200 NVL", "h200-nvl"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA A100 80GB PCIe", "a100"),
        ("NVIDIA L40S", "l40s"),  # not the L4, nor the L40
        ("NVIDIA L40", "l40"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA A10G", "a10"),
        ("Tesla T4", None),
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_device_names_map_to_their_chip(device_name, chip):
    assert chip_of(device_name) == chip


def test_dense_peaks_by_precision():
    h100 = "NVIDIA H100 80GB HBM3"
    assert peak_flops(h100, "bf16-mixed") == pytest.approx(989.4 * TFLOPS)
    assert peak_flops(h100, "bf16-true") == peak_flops(h100, "16-mixed") == pytest.approx(989.4 * TFLOPS)
    assert peak_flops(h100, "32-true") == pytest.approx(66.9 * TFLOPS)
    assert peak_flops(h100, "32-true", tf32_matmuls=True) == pytest.approx(494.7 * TFLOPS)
    assert peak_flops("NVIDIA A100-SXM4-40GB", "bf16-mixed") == pytest.approx(312 * TFLOPS)
    assert peak_flops("NVIDIA H200", "bf16-mixed") == pytest.approx(989.5 * TFLOPS)  # dense, not 2 PFLOP/s
    assert peak_flops("NVIDIA L40S", "bf16-mixed") == pytest.approx(362 * TFLOPS)
    assert peak_flops("Tesla T4", "bf16-mixed") is None  # unknown device: no peak, so no MFU
    assert peak_flops(None, "bf16-mixed") is None
    assert peak_flops(h100, "64-true") is None
    assert device_peak_flops(torch.device("cpu"), "bf16-mixed") is None


def test_mfu_arithmetic():
    # 400k tokens/s at 0.65 GFLOP per token on a 989.4 TFLOP/s device: 26.3%
    assert mfu(400_000, 0.65e9, 989.4 * TFLOPS) == pytest.approx(0.2628, abs=1e-4)
    assert mfu(400_000, 0.65e9, None) is None


def csv_column(run_dir: Path, key: str) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        return [float(row[key]) for row in csv.DictReader(handle) if row.get(key)]


@pytest.mark.slow
def test_bf16_mixed_run_reports_throughput_flops_mfu_and_global_batch(config, tmp_path, monkeypatch):
    # A CPU has no peak in the table, so a run here never reports MFU (see test_distributed). To check
    # the MFU arithmetic of a real run, this one is given a stand-in peak of 1 TFLOP/s.
    monkeypatch.setattr(lmexp.training.callbacks, "device_peak_flops", lambda device, precision: 1 * TFLOPS)
    run_dir = tmp_path / "run"
    metrics = train(
        config(
            "trainer.precision=bf16-mixed",
            "trainer.accumulate_grad_batches=2",
            "callbacks.throughput.window_size=4",
            run_dir=run_dir,
        )
    )
    batch, block = 8, 32  # debug=fast
    assert metrics["perf/global_batch_size"] == batch * 2  # 1 device x 8 x 2 accumulated
    assert metrics["perf/tokens_per_step"] == batch * 2 * block
    model_config = GPTConfig(n_layer=1, n_head=4, n_embd=32, max_seq_len=block, vocab_size=512)
    assert metrics["perf/flops_per_token"] == flops_per_token(model_config, block)
    expected = metrics["perf/tokens_per_sec"] * metrics["perf/flops_per_token"] / TFLOPS
    assert metrics["perf/mfu"] == pytest.approx(expected)
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    assert csv_column(run_dir, "train/global_batch_size") == [16.0]
    assert csv_column(run_dir, "train/device/tokens_per_sec") and csv_column(run_dir, "train/device/mfu")


@pytest.mark.slow  # torch.compile's first compilation takes 30-60 s on 2 CPU cores
def test_compiled_model_trains_like_the_eager_one(config, tmp_path):
    eager = train(config(run_dir=tmp_path / "eager"))
    compiled = train(config("compile=true", run_dir=tmp_path / "compiled"))
    assert compiled["val/loss"] == pytest.approx(eager["val/loss"], rel=1e-3)
    assert compiled["perf/flops_per_token"] == eager["perf/flops_per_token"]
