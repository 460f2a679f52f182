"""Cross-group checks (lmexp/config/checks.py): names that become files or dirs stay inside the output dir."""

from __future__ import annotations

import pytest

from lmexp.config.checks import output_name_problems
from lmexp.config.compose import compose_job
from lmexp.config.settings import load_settings
from lmexp.errors import ConfigError
from tests.sweeps.sweep_helpers import lmexp_env, run_lmexp, sweep_args

LOGGERS = {"csv": {"name": "csv", "version": ""}, "wandb": {"name": "run", "project": "lmexp"}}
CALLBACKS = {"checkpoint": {"filename": "best-step{step}"}}


def test_the_default_names_are_plain():
    assert output_name_problems(LOGGERS, CALLBACKS) == []
    assert output_name_problems({}, None) == []  # logger=none, no callbacks


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("logger.csv.name", "../../elsewhere"),
        ("logger.csv.version", "/tmp/abs"),
        ("logger.wandb.name", "a/b"),
        ("logger.wandb.project", ".."),
        ("callbacks.checkpoint.filename", "../../last"),
    ],
)
def test_a_path_where_a_name_belongs_is_one_line_naming_the_key(key, value):
    _, node, field = key.split(".")
    loggers = {k: dict(v) for k, v in LOGGERS.items()}
    callbacks = {k: dict(v) for k, v in CALLBACKS.items()}
    (callbacks if key.startswith("callbacks") else loggers)[node][field] = value
    (problem,) = output_name_problems(loggers, callbacks)
    assert problem.startswith(f"{key}={value!r}: expected a plain name") and "outside" in problem


def test_run_and_sweep_names_are_checked_with_the_loggers_in_one_message(tmp_path):
    cfg = compose_job(
        ["debug=fast", "logger=[csv,wandb]", "run_name=../up", "sweep.name=/abs", "logger.csv.name=a/b"],
        tmp_path,
    )
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    message = str(info.value)
    assert "\n" not in message
    for key in ("run_name='../up'", "sweep.name='/abs'", "logger.csv.name='a/b'"):
        assert key in message


@pytest.mark.slow
def test_a_sweep_name_leaving_the_output_dir_stops_before_anything_is_written(tmp_path, cache_dir):
    env = lmexp_env(cache_dir, tmp_path / "home")
    out = tmp_path / "a" / "out"
    result = run_lmexp(
        "train", *sweep_args(out, "../../escaped", "optim.lr=0.01,0.02"), cwd=tmp_path, env=env
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: sweep.name='../../escaped': expected a plain name")
    assert not (tmp_path / "escaped").exists() and not (out / "multirun").exists()
