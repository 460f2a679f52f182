"""``python -m lmexp.plan -m <overrides>``: check every point of a sweep before anything runs.

Takes the same overrides as ``python -m lmexp.train -m``; prints one row per point (parameters, FLOPs per
token, tokens per step, memory per device) and exits 2 naming every bad point. The logic is in
lmexp/sweeps/plan.py.
"""

from __future__ import annotations

from lmexp.cli import run_command

if __name__ == "__main__":
    from lmexp.sweeps.plan import main

    run_command(main)
