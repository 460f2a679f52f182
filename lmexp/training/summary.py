"""The short summary printed at the end of a run."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

ROWS = (
    ("val/loss", "val loss (nats/token)", "{:.4f}"),
    ("val/ppl", "val perplexity", "{:.2f}"),
    ("val/mlm_loss", "val masked-LM loss", "{:.4f}"),
    ("val/acc", "val accuracy (next or masked token)", "{:.2%}"),
    ("val/nsp_acc", "val next-sentence accuracy", "{:.2%}"),
    ("val/bpb", "val bits per byte", "{:.4f}"),
    ("val/bpw", "val bits per word", "{:.3f}"),
    ("val/bpw_floor", "floor (corpus entropy)", "{:.3f}"),
    ("val/exact_match", "val exact match (SQuAD)", "{:.2%}"),
    ("val/f1", "val F1", "{:.4f}"),
    ("test/loss", "test loss", "{:.4f}"),
    ("test/exact_match", "test exact match (SQuAD)", "{:.2%}"),
    ("test/ppl", "test perplexity", "{:.2f}"),
    ("test/bpb", "test bits per byte", "{:.4f}"),
    ("perf/tokens_per_sec", "training tokens/s", "{:,.0f}"),
    ("model/trainable_params", "trainable parameters", "{:,.0f}"),
)


def source_names(metrics: dict[str, float]) -> list[str]:
    """The sources of a mixture that have their own validation metrics (``val/<source>/bpb``)."""
    return sorted({key.split("/")[1] for key in metrics if key.startswith("val/") and key.count("/") == 2})


def evaluation_note(metrics: dict[str, float], cfg: DictConfig) -> str | None:
    """What the final validation scored: the whole split, unlike the bounded validations while training."""
    if "val/tokens" not in metrics:
        return None
    during = (cfg.get("data") or {}).get("eval_tokens")
    limit = (cfg.get("trainer") or {}).get("limit_val_batches", 1.0)
    scored = "the whole val split" if limit == 1.0 else f"trainer.limit_val_batches={limit} of the val split"
    bounded = f"; during training at most {int(during):,} tokens per validation" if during else ""
    return f"val metrics: {scored}, {int(metrics['val/tokens']):,} tokens{bounded}"


def print_summary(metrics: dict[str, float], run_dir: Path, cfg: DictConfig) -> None:
    """A table of the headline metrics and where the run's files are."""
    table = Table(title="lmexp run summary", show_header=False, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label, fmt in ROWS:
        if key in metrics:
            table.add_row(label, fmt.format(metrics[key]))
    if "val/bpw" in metrics and "val/bpw_floor" in metrics:
        table.add_row("gap to floor (bits/word)", f"{metrics['val/bpw'] - metrics['val/bpw_floor']:.3f}")
    for name in source_names(metrics):
        if f"val/{name}/bpb" in metrics:
            table.add_row(f"val bits per byte: {name}", f"{metrics[f'val/{name}/bpb']:.4f}")
    table.add_row("steps", f"{int(metrics.get('perf/global_step', 0))}")
    console = Console()
    console.print(table)
    if note := evaluation_note(metrics, cfg):
        console.print(note, soft_wrap=True)
    # soft_wrap: a long path stays on one line, so it can be copied (and found by scripts)
    console.print(f"run dir: {run_dir}  (metrics.json, checkpoints/, .hydra/config.yaml)", soft_wrap=True)
