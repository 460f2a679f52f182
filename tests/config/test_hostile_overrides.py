"""Hostile overrides, generated from the config schemas: every one must end in one line naming its key.

Each schema field of every group gets the wrong overrides its type allows (wrong type, out of range, empty
string, non-ASCII, a path for a name, a malformed list) plus an unknown key and an unknown option per group.
Values Hydra's grammar reads are checked in process: the override is parsed by Hydra's own override parser
and set into a composed config, then ``load_settings`` must refuse it (one config per model kind, composed
and resolved once, so a value reaches only its own key, not those that interpolate it). Overrides Hydra
itself refuses (grammar, unknown key, unknown option) are composed for real and Hydra's report goes through
the CLI's folding (``lmexp.cli.fold_hydra_report``). A sample goes through the real CLI (slow).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf, open_dict

from lmexp.cli import fold_hydra_report
from lmexp.config.compose import compose_job
from lmexp.config.settings import RunOptions, SweepOptions, load_settings, target_class
from lmexp.errors import ConfigError

BASES = {  # one valid config per model kind; the groups' schemas are read from them
    "gpt": ["debug=fast"],
    "llama": ["debug=fast", "model=llama"],
    "lstm": ["debug=fast", "model=lstm"],
    "bert": ["debug=fast", "model=bert", "task=mlm"],
}
GROUPS = ("model", "task", "data", "tokenizer", "optim", "trainer", "scheduler")
OPTION_GROUPS = (*GROUPS, "logger", "callbacks", "debug", "paths", "sweep", "experiment")


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run_dir = tmp_path_factory.mktemp("run")
    composed = {name: compose_job(overrides, run_dir) for name, overrides in BASES.items()}
    for cfg in composed.values():
        OmegaConf.resolve(cfg)  # once: load_settings resolves the whole config, ~0.3 s with interpolations
        load_settings(cfg)  # valid as they are: every problem found below is the override's
    return composed


def _schemas(cfg: Any) -> Iterator[tuple[str, type]]:
    """(key prefix, schema) of every group in ``cfg`` and of the top-level and sweep keys."""
    yield "", RunOptions
    yield "sweep", SweepOptions
    for name in GROUPS:
        if cfg.get(name) is not None:
            yield name, target_class(cfg[name], name)


def _ranged(field: dataclasses.Field) -> list[str]:
    meta = field.metadata
    values = []
    if meta.get("gt") is not None:
        values.append(str(meta["gt"]))
    if meta.get("ge") is not None:
        values.append(str(meta["ge"] - 1))
    if meta.get("lt") is not None:
        values.append(str(meta["lt"]))
    if meta.get("le") is not None:
        values.append(str(meta["le"] + 1))
    return values


def _base_type(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint


def wrong_values(field: dataclasses.Field, hint: Any) -> list[str]:
    """Override values (as typed on the command line) that ``field`` must refuse."""
    kind, origin = _base_type(hint), typing.get_origin(_base_type(hint))
    if kind is bool:
        return ["maybe", "2", "''", '"是"']
    if kind in (int, float):
        wrong = ["abc", "''", '"学习率"', "[1,2]", *_ranged(field)]
        return [*wrong, "1.5"] if kind is int else wrong
    if origin is Literal:
        return ["no_such_choice", "''", '"选项"', "3"]
    if kind is str:
        wrong = ["''"] if field.default not in ("", None, dataclasses.MISSING) else []
        if field.metadata.get("plain_name"):
            wrong += ["a/b", "'..'", "'/etc'", "'../../outside'"]
        return wrong
    if origin is list:
        return ["{a:1}", "''"]
    if origin is dict:
        return ["[1,2]", "''"]
    return []


def value_cases(bases: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(base, key, override) for every wrong value of every field of every schema, each once."""
    seen = set()
    for base, cfg in bases.items():
        for prefix, schema in _schemas(cfg):
            hints = typing.get_type_hints(schema)
            for field in dataclasses.fields(schema):
                if not field.init or field.name == "extra":
                    continue
                key = f"{prefix}.{field.name}" if prefix else field.name
                for value in wrong_values(field, hints[field.name]):
                    if (schema, key, value) not in seen:
                        seen.add((schema, key, value))
                        yield base, key, f"{key}={value}"


@contextlib.contextmanager
def _applied(cfg: Any, override: str) -> Iterator[Any]:
    """``cfg`` with ``override`` applied as Hydra would apply it to a composed config, for the body (set and
    put back in place: copying the config for each case would cost most of the test's time)."""
    parsed = OverridesParser.create().parse_override(override)
    key = parsed.key_or_group
    missing = object()
    before = OmegaConf.select(cfg, key, default=missing)
    with open_dict(cfg):
        OmegaConf.update(cfg, key, parsed.value(), merge=False, force_add=True)
        try:
            yield cfg
        finally:
            if before is missing:
                parent, _, name = key.rpartition(".")
                del (OmegaConf.select(cfg, parent) if parent else cfg)[name]
            else:
                OmegaConf.update(cfg, key, before, merge=False)


def _names_key(line: str, key: str) -> bool:
    return f"{key}=" in line or f"{key} " in line or f"{key}:" in line or f"key {key})" in line


def test_a_few_hundred_wrong_values_each_give_one_line_naming_the_key(bases):
    cases = list(value_cases(bases))
    assert len(cases) >= 200
    accepted, unnamed = [], []
    for base, key, override in cases:
        try:
            with _applied(bases[base], override) as cfg:
                load_settings(cfg)
        except ConfigError as error:
            line = str(error)
            if "\n" in line or not _names_key(line, key):
                unnamed.append(f"{override} ({base}): {line}")
        else:
            accepted.append(f"{override} ({base})")
    assert not accepted, f"{len(accepted)} wrong overrides accepted: {accepted}"
    for cfg in bases.values():
        load_settings(cfg)  # every override was put back
    assert not unnamed, unnamed


def hydra_report(error: HydraException) -> str:
    """What Hydra prints for a composition error (hydra/_internal/utils.py run_and_report)."""
    text = str(error) + os.linesep
    if error.__cause__ is not None and "omegaconf" in type(error.__cause__).__module__:
        text += str(error.__cause__) + os.linesep
    return text + "\nSet the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.\n"


def hydra_cases(bases: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(key, override) that Hydra itself refuses: unknown keys and options, malformed lists, bare
    non-ASCII values."""
    for name in OPTION_GROUPS:
        yield name, f"{name}=no_such_option"
    yield "no_such_key", "no_such_key=1"
    for key, override in (c[1:] for c in value_cases({"gpt": bases["gpt"]})):
        prefix = key.rpartition(".")[0]
        if prefix and override.endswith("=[1,2]"):
            yield key, f"{key}=[1,2"  # malformed list
            yield key, f"{key}=[1,,2]"
        if override.endswith("=''"):
            yield key, f"{key}=大语言模型"  # non-ASCII, unquoted
        if prefix and override.endswith("=abc"):
            yield f"{prefix}.no_such_key", f"{prefix}.no_such_key=1"  # unknown key in a group


def test_overrides_hydra_refuses_fold_into_one_line_naming_the_key(bases, tmp_path):
    cases = sorted(set(hydra_cases(bases)))
    assert len(cases) >= 40
    bad = []
    for key, override in cases:
        try:
            load_settings(compose_job(["debug=fast", override], tmp_path))
        except HydraException as error:
            line = fold_hydra_report(hydra_report(error), [override])
        except ConfigError as error:
            line = str(error)
        else:
            bad.append(f"{override}: accepted")
            continue
        if "\n" in line or not (_names_key(line, key) or f"'{key}'" in line or f"{key}/" in line):
            bad.append(f"{override}: {line}")
    assert not bad, bad


CLI_SAMPLE = [
    ("run_name=[大语,言模型]", "run_name"),  # non-ASCII is quoted for Hydra unless it holds Hydra's syntax
    ("optim.lr=", "optim.lr"),
    ("model.n_layer=[1,2", "model.n_layer"),
    ("model=no_such_model", "model"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("override", "key"), CLI_SAMPLE, ids=[c[1] for c in CLI_SAMPLE])
def test_a_sample_through_the_real_cli(cli, override, key, tmp_path: Path):
    # Non-ASCII through a real ``python -m`` (the OS hands argv over as bytes); the rest forked
    # from a warm interpreter (tests/zygote.py).
    run_dir = f"hydra.run.dir={tmp_path / 'run'}"
    result = cli("lmexp.train", "debug=fast", run_dir, override, timeout=120, forked=override.isascii())
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert key in lines[0] and "Traceback" not in result.stderr
    if not override.isascii():
        assert "quote it" in lines[0]
