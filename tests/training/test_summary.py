"""The end-of-run summary: bits per byte, each source of a mixture, and what the final validation scored."""

from __future__ import annotations

from omegaconf import OmegaConf

from lmexp.training.summary import evaluation_note, print_summary, source_names

METRICS = {
    "val/loss": 2.0, "val/bpb": 1.25, "test/bpb": 1.3, "val/tokens": 123456.0, "val/web/bpb": 1.1,
    "val/web/loss": 1.9, "val/books/bpb": 1.4, "test/web/bpb": 1.2, "perf/global_step": 10.0,
}  # fmt: skip


def test_summary_shows_bpb_sources_and_the_scored_split(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps at the terminal's width
    cfg = OmegaConf.create({"data": {"eval_tokens": 131072}, "trainer": {"limit_val_batches": 1.0}})
    assert source_names(METRICS) == ["books", "web"]
    print_summary(METRICS, tmp_path, cfg)
    out = capsys.readouterr().out
    assert "val bits per byte" in out and "1.2500" in out and "test bits per byte" in out
    assert "val bits per byte: web" in out and "1.1000" in out and "val bits per byte: books" in out
    assert "val metrics: the whole val split, 123,456 tokens; during training at most 131,072" in out


def test_note_names_a_limited_final_validation() -> None:
    cfg = OmegaConf.create({"data": {"eval_tokens": 0}, "trainer": {"limit_val_batches": 4}})
    assert (
        evaluation_note(METRICS, cfg)
        == "val metrics: trainer.limit_val_batches=4 of the val split, 123,456 tokens"
    )
    assert evaluation_note({"val/loss": 1.0}, cfg) is None
