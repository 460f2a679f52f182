"""metrics.csv is never missing or half-written: the first save and every header change replace it whole."""

from __future__ import annotations

import csv

from lmexp.training.csv_log import CSVLogger, read_csv_log


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_an_earlier_runs_file_stays_until_the_first_save_replaces_it(tmp_path):
    path = tmp_path / "csv" / "metrics.csv"
    path.parent.mkdir()
    path.write_text("step,train/loss\n0,9.0\n1,8.0\n")
    logger = CSVLogger(tmp_path, name="csv", version="")
    logger.log_metrics({"train/loss": 7.0}, step=0)  # the writer starts here
    assert _rows(path) == [{"step": "0", "train/loss": "9.0"}, {"step": "1", "train/loss": "8.0"}]
    logger.save()
    assert _rows(path) == [{"step": "0", "train/loss": "7.0"}]
    assert [p.name for p in path.parent.iterdir()] == ["metrics.csv"]  # no temporary left


def test_rows_append_and_a_new_column_rewrites_the_file_with_every_row(tmp_path):
    logger = CSVLogger(tmp_path, name="csv", version="")
    path = tmp_path / "csv" / "metrics.csv"
    logger.log_metrics({"train/loss": 3.0}, step=0)
    logger.save()
    inode = path.stat().st_ino
    logger.log_metrics({"train/loss": 2.0}, step=1)
    logger.save()
    assert path.stat().st_ino == inode  # appended in place
    logger.log_metrics({"val/loss": 2.5}, step=1)
    logger.save()
    assert path.stat().st_ino != inode  # a new file renamed over the old one
    assert [(r["step"], r["train/loss"], r["val/loss"]) for r in _rows(path)] == [
        ("0", "3.0", ""), ("1", "2.0", ""), ("1", "", "2.5")
    ]  # fmt: skip


def test_a_last_line_cut_short_by_a_kill_is_dropped(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,train/loss\n0,3.0\n1,2.0\n2,1.2")  # the kill came inside "2,1.25\n"
    assert read_csv_log(path) == [{"step": "0", "train/loss": "3.0"}, {"step": "1", "train/loss": "2.0"}]
    assert read_csv_log(tmp_path / "none.csv") == []


def test_rows_of_a_damaged_log_without_a_numeric_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,train/loss\n0,3.0\nabc,2.0\n,1.0\n2,1.5\n")
    assert read_csv_log(path) == [{"step": "0", "train/loss": "3.0"}, {"step": "2", "train/loss": "1.5"}]
