"""``python -m lmexp.plan``: every point composed and checked, figures from the model, bad points named."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lmexp.cli import run_command
from lmexp.config.compose import config_dir
from lmexp.errors import ConfigError
from lmexp.sweeps.plan import main, plan
from lmexp.training.perf import flops_per_token


@pytest.mark.slow
def test_plan_names_every_bad_point_and_exits_non_zero(capsys):
    with pytest.raises(SystemExit) as stop:  # as python -m lmexp.plan runs it
        run_command(lambda: main(["-m", "+sweep=gpt_lr_width", "model.n_head=4,3", "optim.lr=1e-3"]))
    assert stop.value.code == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: 3 of 6 points are bad; ")
    for num, width in ((1, 64), (3, 128), (5, 256)):
        assert (
            f"point {num} (model.n_embd={width} model.n_head=3): model.n_embd={width} is not divisible" in err
        )
    assert "lmexp sweep plan: 6 points" in out
    assert out.count(" ok ") == 3  # the valid points still get their row


@pytest.mark.slow
def test_plan_figures_come_from_the_model_it_would_train():
    from lmexp.models.gpt import GPTConfig

    vocab_size = OmegaConf.load(Path(config_dir()) / "tokenizer" / "bpe.yaml").vocab_size  # the tokenizer's
    points = plan(["-m", "+sweep=gpt_lr_width", "optim.lr=1e-3", "model.n_embd=64,128", "data.batch_size=16"])
    assert [p.ok for p in points] == [True, True]
    for point, width in zip(points, (64, 128), strict=True):
        config = GPTConfig(
            n_layer=4, n_head=4, n_embd=width, vocab_size=vocab_size, max_seq_len=128, dropout=0.0
        )
        model = config.build()
        assert point.parameters == sum(p.numel() for p in model.parameters())
        assert point.flops_per_token == flops_per_token(config, 128, model=model)
        assert point.tokens_per_step == 16 * 128
        assert point.memory["params"] == point.parameters * 4  # 32-true, nothing sharded
        assert point.memory["optimizer"] == point.parameters * 8  # AdamW: two fp32 states
    assert points[1].memory["total"] > points[0].memory["total"]


@pytest.mark.slow
def test_bf16_mixed_and_fsdp_change_the_memory_per_device():
    [plain] = plan(["model.n_embd=64"])
    [sharded] = plan(["model.n_embd=64", "trainer=fsdp", "trainer.devices=4"])
    assert sharded.memory["params"] == plain.memory["params"] / 4
    assert sharded.memory["activations"] < plain.memory["activations"]  # bf16 activations
    assert sharded.tokens_per_step == 4 * plain.tokens_per_step


# bert_optuna is checked at the corners of its search space; two of its axes are pinned to keep this short.
@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ["+sweep=gpt_lr_width"],
        ["+sweep=slurm_gpt"],
        ["+sweep=bert_optuna", "optim.weight_decay=0.1", "scheduler.warmup_steps=20"],
    ],
)
def test_the_ready_sweeps_are_valid_as_written(args, capsys):
    points = plan(["-m", *args])
    assert len(points) >= 9 and all(p.ok for p in points)
    assert f"plan: all {len(points)} points are valid" in capsys.readouterr().out


@pytest.mark.slow
def test_the_fine_tuning_sweep_asks_for_its_data():
    with pytest.raises(ConfigError, match="data.train_path is not set") as error:
        plan(["-m", "+sweep=finetune_lr_seed"])
    assert "9 of 9 points are bad" in str(error.value)
