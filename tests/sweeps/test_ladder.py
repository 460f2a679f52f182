"""Scaling-law ladders: the isoFLOP grid, its checks before any job starts, and a tiny ladder end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lmexp.config.compose import compose_job
from lmexp.errors import ConfigError
from lmexp.models.gpt import GPTConfig
from lmexp.sweeps.ladder import (
    LadderSettings,
    expected_optimum,
    ladder_points,
    logged_metrics,
    minimum_budget,
    model_sizes,
    plan_ladder,
)
from lmexp.training.perf import matmul_parameters
from tests.sweeps.sweep_helpers import records, run_lmexp, sweep_args

TOKENS_PER_STEP = 16 * 128  # sweeps/ladder.yaml: data.batch_size x data.block_size


def ladder_config(*overrides: str, run_dir: Path = Path("/tmp/ladder-plan")):
    """The composed config of ``python -m lmexp.train -m +sweep=ladder <overrides>`` (hydra node kept)."""
    return compose_job(["+sweep=ladder", *overrides], run_dir, keep_hydra=True)


# --------------------------------------------------------------------------------------- planning
def test_sizes_follow_the_rule_and_n_is_lmexps_count_of_the_built_model():
    cfg = ladder_config("sweep.ladder.depths=[1,2,3]", "sweep.ladder.width_per_layer=32")
    sizes = model_sizes(cfg, LadderSettings.from_config(cfg.sweep.ladder))
    assert [(s.depth, s.width, s.heads) for s in sizes] == [(1, 32, 2), (2, 64, 4), (3, 96, 6)]
    for size in sizes:
        model = GPTConfig(n_layer=size.depth, n_embd=size.width, n_head=size.heads, vocab_size=1024,
                          max_seq_len=128).build()  # fmt: skip
        assert size.params == matmul_parameters(model)
        # Every parameter but the position embedding: the tied head counts the token embedding's matrix.
        assert size.params == sum(p.numel() for p in model.parameters()) - model.pos_emb.weight.numel()


def test_each_point_spends_its_budget_and_carries_its_overrides():
    cfg = ladder_config("sweep.budgets=[6e11,2e12]")
    points = plan_ladder(cfg)
    assert sorted({p.budget for p in points}) == [6e11, 2e12]
    for point in points:
        assert point.steps == round(point.budget / (6 * point.size.params * TOKENS_PER_STEP))
        assert point.steps >= cfg.sweep.ladder.min_steps
        assert point.flops == pytest.approx(point.budget, rel=0.02)
        assert point.warmup_steps == max(1, round(0.05 * point.steps))
        assert point.val_check_interval == math.ceil(point.steps / 2)
    point = points[0]
    assert ladder_points(cfg)[0] == [
        f"model.n_layer={point.size.depth}",
        f"model.n_embd={point.size.width}",
        f"model.n_head={point.size.heads}",
        f"trainer.max_steps={point.steps}",
        f"scheduler.warmup_steps={point.warmup_steps}",
        f"trainer.val_check_interval={point.val_check_interval}",
        "sweep.budget=6e+11",
    ]


def test_each_budget_takes_the_sizes_nearest_its_expected_optimum_that_get_enough_steps():
    cfg = ladder_config("sweep.budgets=[2e12,2e14]", "sweep.ladder.points_per_budget=3")
    settings = LadderSettings.from_config(cfg.sweep.ladder)
    by_budget: dict[float, list[int]] = {}
    for point in plan_ladder(cfg):
        by_budget.setdefault(point.budget, []).append(point.size.params)
    sizes = [s.params for s in model_sizes(cfg, settings)]
    for budget, chosen in by_budget.items():
        centre = math.log(expected_optimum(budget, settings))
        fitting = [n for n in sizes if round(budget / (6 * n * TOKENS_PER_STEP)) >= settings.min_steps]
        nearest = sorted(fitting, key=lambda n: abs(math.log(n) - centre))[:3]
        assert chosen == sorted(nearest)
    assert by_budget[2e14] != by_budget[2e12]  # the grid moves up with the budget


@pytest.mark.slow  # composes and checks every point: about 10 s on 2 cores
def test_every_point_of_the_default_ladder_is_a_valid_run_for_the_plan():
    from lmexp.sweeps.plan import plan_point

    args = ["+sweep=ladder"]
    points = ladder_points(ladder_config())
    assert len(points) >= 9
    plans = [plan_point(num, [*args, *point], "/tmp/ladder-plan") for num, point in enumerate(points)]
    assert all(p.ok for p in plans), [p.problems for p in plans if not p.ok]
    assert [p.tokens_per_step for p in plans] == [TOKENS_PER_STEP] * len(points)


# -------------------------------------------------------------------------------------- bad input
def test_a_budget_below_the_smallest_sizes_minimum_names_the_minimum():
    cfg = ladder_config("sweep.budgets=[1e9,2e12]")
    settings = LadderSettings.from_config(cfg.sweep.ladder)
    minimum = minimum_budget(model_sizes(cfg, settings), settings, TOKENS_PER_STEP)
    with pytest.raises(ConfigError) as error:
        plan_ladder(cfg)
    message = str(error.value)
    assert message.startswith("sweep.budgets: 1e+09 FLOPs is below the ladder's minimum of ")
    assert f"{minimum:.3g} FLOPs" in message and "min_steps=30" in message and "\n" not in message
    assert plan_ladder(ladder_config(f"sweep.budgets=[{minimum}]"))  # the minimum itself is enough


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("sweep.budgets=[]", "sweep.budgets=[]: expected a non-empty list of positive FLOP counts"),
        ("sweep.budgets=[1e12,-1e12]", "-1e+12 is not a positive number"),
        ("sweep.budgets=[1e12,abc]", "'abc' is not a positive number"),
        ("sweep.budgets=[1e12,1e12]", "1e+12 given more than once"),
        (
            "sweep.ladder.head_dim=24",
            "sweep.ladder.head_dim=24 does not divide sweep.ladder.width_per_layer=16",
        ),
        ("sweep.ladder.points_per_budget=1", "sweep.ladder.points_per_budget=1: expected an integer >= 2"),
    ],
)
def test_bad_budgets_and_settings_are_one_line_each(override, expected):
    with pytest.raises(ConfigError, match=None) as error:
        plan_ladder(ladder_config(override))
    assert expected in str(error.value)


def test_a_metric_the_task_does_not_log_names_what_it_logs():
    with pytest.raises(ConfigError) as error:
        plan_ladder(ladder_config("model=bert"))  # masked LM: no bits per word
    assert str(error.value) == (
        "objective=val/bpw: task=mlm does not log it (task=mlm logs val/loss, val/mlm_loss, val/ppl, "
        "val/acc, val/nsp_loss, val/nsp_acc, val/nsp_f1); use objective=val/loss"
    )
    assert plan_ladder(ladder_config("model=bert", "objective=val/loss"))  # bert's loss is fine
    with pytest.raises(ConfigError, match=r"objective=val/acc: a ladder fits val/bpw or val/loss \(task=clm"):
        plan_ladder(ladder_config("objective=val/acc"))


def test_a_model_without_depth_width_and_heads_is_refused():
    with pytest.raises(ConfigError, match=r"model \(LSTMConfig\) has no model.n_head: a ladder sizes"):
        plan_ladder(ladder_config("model=lstm"))


def test_the_command_line_may_not_sweep_or_set_what_the_ladder_sets():
    args = ["optim.lr=1e-3,3e-3", "trainer.max_steps=100", "optim.lr=1e-3"]
    with pytest.raises(ConfigError) as error:
        plan_ladder(ladder_config(args[2]), arguments=args)
    assert str(error.value) == (
        "optim.lr=1e-3,3e-3: a ladder's points come from sweep.budgets; run one ladder per value of optim.lr "
        "(with its own sweep.name); trainer.max_steps=100: trainer.max_steps is set by the ladder for each "
        "point; leave it out"
    )


@pytest.mark.slow  # a subprocess
def test_a_bad_ladder_stops_with_one_line_before_any_job(tmp_path: Path, env: dict[str, str]):
    result = run_lmexp(
        "train", "-m", "+sweep=ladder", "sweep.budgets=[1e6]", f"paths.output_dir={tmp_path}",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("error: sweep.budgets: 1e+06 FLOPs is below the ladder's minimum of ")
    assert not (tmp_path / "multirun").exists()  # nothing was launched


# ------------------------------------------------------------------------------------ end to end
# 2 budgets x 2 sizes of a debug-sized GPT: depth 1 and 2 (32 and 64 wide), 8 x 32 tokens per step.
TINY_LADDER = (
    "+sweep=ladder",
    "sweep.budgets=[1.2e9,2.4e9]",
    "sweep.ladder.depths=[1,2]",
    "sweep.ladder.points_per_budget=2",
    "sweep.ladder.min_steps=5",
    "tokenizer.vocab_size=512",
    "data.n_documents=600",
    "data.batch_size=8",
    "data.splits.train=0.9",
    "data.splits.val=0.05",
    "data.splits.test=0.05",
)


@pytest.mark.slow  # trains 4 tiny points in a subprocess
def test_a_tiny_ladder_runs_as_a_sweep_and_fits(workdir: Path, env: dict[str, str]):
    from lmexp.sweeps.scaling_report import is_ladder_sweep, scaling_section, summary_line

    args = sweep_args(workdir / "out", "tiny_ladder", *TINY_LADDER)
    result = run_lmexp("train", *args, cwd=workdir, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lmexp ladder: 2 budgets, 4 points" in result.stdout
    sweep_dir = workdir / "out" / "multirun" / "tiny_ladder"
    points = records(sweep_dir)
    assert sorted(points) == [0, 1, 2, 3] and all(p["status"] == "finished" for p in points.values())
    planned = ladder_points(compose_job(list(args[1:]), sweep_dir / "plan", keep_hydra=True))
    for num, point in points.items():
        assert point["overrides"][-len(planned[num]) :] == planned[num]  # the plan is what ran
        metrics = json.loads((sweep_dir / str(num) / "metrics.json").read_text())
        steps = int(next(o for o in planned[num] if o.startswith("trainer.max_steps=")).split("=")[1])
        assert metrics["perf/global_step"] == steps and metrics["perf/tokens_per_step"] == 256
        cfg = compose_job(list(args[1:]) + planned[num], sweep_dir / "check")
        assert set(logged_metrics(cfg)) <= set(metrics)  # what the ladder says the task logs, it logs
    assert is_ladder_sweep(sweep_dir)
    markdown, plots = scaling_section(sweep_dir, n_resamples=8)
    fitted = json.loads((sweep_dir / "scaling.json").read_text())
    for row in fitted["points"]:
        # The fitter's N is the trained model's: its FLOPs per token less the attention term, over 6.
        metrics = json.loads((sweep_dir / str(row["point"]) / "metrics.json").read_text())
        attention = 12 * row["depth"] * row["width"] * 32
        assert row["N"] == (metrics["perf/flops_per_token"] - attention) / 6
    assert "| E | 6.094 (fixed) |" in markdown and "free E: 4 points cannot fix 5 parameters" in markdown
    assert [p.name for p in plots] == ["isoflop.png", "frontier.png"] and all(p.stat().st_size for p in plots)
    assert fitted["fits"]["fixed E"]["resamples"] == 8
    assert summary_line(sweep_dir).startswith("scaling (val/bpw): fixed E: E=6.094, alpha=")


def test_a_grid_sweep_is_not_a_ladder(tmp_path: Path):
    from lmexp.sweeps.scaling_report import is_ladder_sweep

    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    (tmp_path / "0" / ".hydra" / "config.yaml").write_text("sweep: {name: grid}\nobjective: val/loss\n")
    assert not is_ladder_sweep(tmp_path)
