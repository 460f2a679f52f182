"""The language-model data module's settings: which engine sources each ``data=`` option makes, the checks of
``data.sources``/``data.hf``, the batches it collates, and the share of preparation work of a process.
(End-to-end runs through the CLI: tests/data/test_datamodule_cli.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmexp.config.schema import parse
from lmexp.config.settings import load_settings
from lmexp.data.context import DataContext
from lmexp.data.datamodule import BlockCollate, TextDataConfig, preparation_share
from lmexp.data.tokenizer import TokenizerConfig
from lmexp.errors import ConfigError


def specs_of(tmp_path: Path, **values) -> list:
    config = parse(TextDataConfig, values, "data")
    return config.build(DataContext(TokenizerConfig(), tmp_path)).source_specs()


def problems_of(**values) -> str:
    with pytest.raises(ConfigError) as info:
        parse(TextDataConfig, values, "data")
    return str(info.value)


def test_text_with_held_out_files_makes_one_source_per_split(tmp_path: Path) -> None:
    (only,) = specs_of(tmp_path, source="text", path="c.txt.gz", text_field="body")
    assert (only.name, only.path, only.text_field, only.assign_split, only.path_key) == (
        "text", "c.txt.gz", "body", None, "data.path"
    )  # fmt: skip
    train, val, test = specs_of(
        tmp_path, source="text", path="a.txt", val_path="v.jsonl", test_path="t.parquet"
    )
    assert [s.assign_split for s in (train, val, test)] == ["train", "val", "test"]
    assert [s.path_key for s in (train, val, test)] == ["data.path", "data.val_path", "data.test_path"]


def test_hf_source_carries_every_datasets_option(tmp_path: Path) -> None:
    hf = {"path": "json", "data_files": ["a.jsonl"], "name": "x", "split": "dev", "revision": "r1"}
    (spec,) = specs_of(tmp_path, source="hf", hf={**hf, "streaming": True}, text_field="content")
    assert (spec.format, spec.path, spec.data_files, spec.hf_name, spec.split) == (
        "hf",
        "json",
        ["a.jsonl"],
        "x",
        "dev",
    )
    assert (spec.revision, spec.streaming, spec.text_field, spec.key) == ("r1", True, "content", "data.hf")


def test_mixture_by_mapping_or_list_keeps_order_and_weights(tmp_path: Path) -> None:
    mapping = {"web": {"path": "w.jsonl.zst", "weight": 3}, "books": {"path": "b/", "format": "txt"}}
    specs = specs_of(tmp_path, source="mixture", sources=mapping)
    assert [(s.name, s.weight, s.format) for s in specs] == [("web", 3.0, "auto"), ("books", 1.0, "txt")]
    listed = [{"name": "web", "path": "w.jsonl"}, {"name": "held", "path": "h.txt", "assign_split": "val"}]
    specs = specs_of(tmp_path, source="mixture", sources=listed)
    assert [(s.name, s.assign_split) for s in specs] == [("web", None), ("held", "val")]


def test_builtin_corpus_is_a_source_of_its_documents_file(tmp_path: Path) -> None:
    (spec,) = specs_of(tmp_path, source="builtin", n_documents=5)
    assert spec.format == "txt" and Path(spec.path).name == "documents.txt" and Path(spec.path).is_file()


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            {"source": "mixture", "sources": {"web": {"path": "w.txt", "weight": 0}}},
            "data.sources.web.weight",
        ),
        ({"source": "mixture", "sources": {"web": {"weight": 1}}}, "data.sources.web.path is not set"),
        (
            {"source": "mixture", "sources": {"web": {"path": "w", "colour": 1}}},
            "data.sources.web.colour is not",
        ),
        ({"source": "mixture", "sources": [{"path": "w.txt"}]}, r"data.sources\[0\].name=None"),
        ({"source": "mixture", "sources": {}}, "data.sources is empty"),
        (
            {"source": "mixture", "sources": {"v": {"path": "v", "assign_split": "val"}}},
            "no source has training",
        ),
        ({"source": "hf", "hf": {}}, "data.hf.path is not set"),
        ({"source": "hf", "hf": {"path": "json", "splt": "x"}}, "data.hf.splt is not a setting"),
        (
            {"source": "text", "path": "a", "sources": {"w": {"path": "w"}}},
            "data.sources is set but data.source=text",
        ),
        ({"source": "text"}, "data.path is not set"),
        ({"source": "text", "path": "a", "test_path": "t"}, "data.val_path is not set"),
        ({"eval_tokens": -1}, "data.eval_tokens"),
    ],
)
def test_bad_settings_name_their_key(values: dict, expected: str) -> None:
    message = problems_of(**values)
    assert "\n" not in message
    assert pytest.importorskip("re").search(expected, message), message


def test_hf_missing_path_is_reported_once(config) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(config("data=hf"))
    assert str(info.value).count("data.hf.path is not set") == 1


def test_document_mask_refused_for_lstm_and_masked_lm(config) -> None:
    load_settings(config("model=gpt", "data.document_mask=true"))
    load_settings(config("model=llama", "data.document_mask=true"))
    with pytest.raises(ConfigError, match=r"model=lstm cannot mask attention .* gpt, llama"):
        load_settings(config("model=lstm", "data.document_mask=true"))
    with pytest.raises(ConfigError, match="task=mlm reads no packed blocks"):
        load_settings(config("model=bert", "data.document_mask=true"))


def test_block_collate_adds_document_ids_and_one_source() -> None:
    eos = 0
    items = [
        {
            "input_ids": torch.tensor([0, 5, 6, 0, 7]),
            "labels": torch.tensor([5, 6, 0, 7, 8]),
            "source": torch.tensor(1),
        },
        {
            "input_ids": torch.tensor([8, 0, 9, 9, 0]),
            "labels": torch.tensor([0, 9, 9, 0, 4]),
            "source": torch.tensor(1),
        },
    ]
    batch = BlockCollate(eos, document_mask=True)(items)
    assert batch["document_ids"].tolist() == [[1, 1, 1, 2, 2], [0, 1, 1, 1, 2]]  # each eos opens a document
    assert batch["source_id"] == 1
    items[1]["source"] = torch.tensor(0)
    plain = BlockCollate(eos, document_mask=False)(items)
    assert "document_ids" not in plain and "source_id" not in plain


@pytest.mark.parametrize(
    ("rank", "world", "environ", "expected"),
    [
        (1, 4, {}, (1, 4)),
        (
            None,
            None,
            {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "3"},
            (2, 3),
        ),
        (
            None,
            None,
            {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "4"},
            (2, 4),
        ),
        (None, None, {"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}, (3, 4)),
        (None, None, {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, (1, 2)),
        (None, None, {}, (0, 1)),
    ],
)
def test_preparation_share(monkeypatch, rank, world, environ, expected) -> None:
    for name in (
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_COUNT",
        "RANK",
        "WORLD_SIZE",
        "SLURM_PROCID",
        "SLURM_NTASKS",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert preparation_share(rank, world) == expected


@pytest.mark.parametrize(("rank", "world"), [(2, 2), (-1, 2), (0, None)])
def test_preparation_share_rejects_bad_ranks(rank, world) -> None:
    with pytest.raises(ConfigError, match="rank"):
        preparation_share(rank, world)
