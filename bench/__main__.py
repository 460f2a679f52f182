"""``python -m bench``: the CPU benchmark suite; ``--gpu`` the GPU one; ``--smoke`` a one-iteration check.

Every figure is a ratio against a peer timed in the same run (bench/common.py says how). Results print
as a table and go to ``bench/out/latest.json`` with the machine and versions. Copy figures worth keeping
into bench/RESULTS.md with the date and command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
CPU_SUITE = ("model_step", "memory", "overhead", "startup", "data")
OPT_IN = ("prepare",)  # minutes and GBs of generated corpus: run only with --only prepare


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's default prints the whole usage first
        from lmexp.errors import UserError

        raise UserError(f"{message} (python -m bench --help lists the options)")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = _OneLineParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, one iteration: checks the code only"
    )
    parser.add_argument("--gpu", action="store_true", help="the GPU suite (GPT-2 small, BERT-base) instead")
    parser.add_argument(
        "--only", choices=CPU_SUITE + OPT_IN, action="append", help="run only these (repeatable)"
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="lmexp config override for lmexp's side",
    )
    parser.add_argument("--out", type=Path, default=OUT / "latest.json", help="where to write the results")
    return parser.parse_args(argv)


def _quiet() -> None:
    os.environ["WANDB_MODE"] = "offline"  # a benchmark never logs to anybody's W&B project
    os.environ.setdefault("WANDB_SILENT", "true")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass


def _print_table(results: list, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.__stdout__, width=max(120, Console(file=sys.__stdout__).width))
    table = Table(title=title)
    for column in ("benchmark", "ratio", "goal", "met", "the ratio is"):
        table.add_column(column, no_wrap=column != "the ratio is")
    for result in results:
        met = {True: "yes", False: "no", None: "-"}[result.met]
        ratio = "-" if result.ratio is None else f"{result.ratio:.3f}"
        table.add_row(result.name, ratio, result.goal, met, result.ratio_meaning)
    console.print(table)
    for result in results:
        console.print(
            f"[bold]{result.name}[/bold]: " + ", ".join(f"{k}={_fmt(v)}" for k, v in result.values.items())
        )
        for note in result.notes:
            console.print(f"    {note}", markup=False)


def _fmt(value: float) -> str:
    if value != value:  # NaN: not measured
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _as_user_error(error: Exception) -> Exception:
    """A bad ``--override`` (Hydra's own error) as the one-line error lmexp's commands report."""
    from hydra.errors import HydraException

    from lmexp.cli import fold_hydra_report
    from lmexp.errors import UserError

    return UserError(fold_hydra_report(str(error))) if isinstance(error, HydraException) else error


def _write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)  # a reader never sees half a file


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    _quiet()
    from bench.common import machine

    if args.gpu:
        suite = {"gpu": "bench.gpu"}
    else:
        names = args.only or CPU_SUITE
        suite = {name: f"bench.{name}" for name in CPU_SUITE + OPT_IN if name in names}
    results, seconds = [], {}
    for name, module_name in suite.items():
        start = time.perf_counter()
        print(f"bench: {name} ...", file=sys.__stderr__, flush=True)
        module = __import__(module_name, fromlist=["run"])
        with open(os.devnull, "w") as sink:  # the runs' own progress output
            stdout, sys.stdout = sys.stdout, sink
            try:
                results += module.run(smoke=args.smoke, overrides=args.override)
            except Exception as error:
                raise _as_user_error(error) from None
            finally:
                sys.stdout = stdout
        seconds[name] = time.perf_counter() - start
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {
        "command": command.strip(),
        "smoke": args.smoke,
        "machine": machine(),
        "seconds": seconds,
        "results": {result.name: result.as_dict() for result in results},
    }
    _write(args.out, payload)
    title = f"{command.strip()} — {sum(seconds.values()):.0f} s" + (
        " (smoke: measures nothing)" if args.smoke else ""
    )
    _print_table(results, title)
    print(f"results: {args.out}", file=sys.__stdout__)
    return 0


if __name__ == "__main__":
    from lmexp.cli import run_command

    run_command(main)
