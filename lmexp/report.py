"""``python -m lmexp.report <sweep dir> [report.key=value ...]``: one report of every point of a sweep.

Writes report.csv, report.md, report.html and plots/ into the sweep dir; the logic is in
lmexp/sweeps/report.py, the options in conf/report.yaml.
"""

from __future__ import annotations

from lmexp.cli import run_command

if __name__ == "__main__":
    from lmexp.sweeps.report import main

    run_command(main)
