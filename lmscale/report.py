"""``lmscale report``: plots and a summary of a run, from its ``metrics.jsonl`` alone; of several runs, their
curves overlaid and a table side by side (with ``lmscale eval --per-position``'s curves where a run has one)."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmscale import run_layout
from lmscale.errors import UsageError
from lmscale.tasks import TASKS

BEST_NAMES = {t.reported_metric: t.best_label for t in TASKS.values() if t.reported_metric and t.best_label}
"""The validation score of each task that has one (accuracy, BLEU), and how the summary names its best."""


@dataclass(frozen=True)
class Summary:
    steps: int
    tokens_seen: int
    final_loss: float | None
    best_val_loss: float | None
    best_val_step: int | None
    mean_tokens_per_s: float | None
    mean_mfu: float | None
    train_time_s: float
    resumes: int
    best_val_score: tuple[str, float, int] | None = None
    """The task's (metric, best value, step): val_mlm_accuracy of a masked LM, val_accuracy of a classifier,
    val_bleu of a seq2seq fine-tune."""
    downstream: dict[str, tuple[float, float, int]] = field(default_factory=dict)
    """Each ``trainer.downstream`` task's last (acc, acc_norm, step)."""

    def rows(self) -> list[tuple[str, str]]:
        def fmt(value: float | None, spec: str) -> str:
            return "n/a" if value is None else format(value, spec)

        best = f"{fmt(self.best_val_loss, '.4f')} (step {self.best_val_step})" if self.best_val_loss else "n/a"
        accuracy = []
        if self.best_val_score is not None:
            key, value, step = self.best_val_score
            accuracy.append((BEST_NAMES[key], f"{value:.4f} (step {step})"))
        downstream = [(f"{name} acc / acc_norm", f"{acc:.4f} / {norm:.4f} (step {step})")
                      for name, (acc, norm, step) in self.downstream.items()]  # fmt: skip
        return [
            ("steps", f"{self.steps:,}"),
            ("tokens seen", f"{self.tokens_seen:,}"),
            ("final loss", fmt(self.final_loss, ".4f")),
            ("best val loss", best),
            *accuracy,
            *downstream,
            ("mean tokens/s", fmt(self.mean_tokens_per_s, ",.0f")),
            ("mean MFU", fmt(self.mean_mfu, ".2%")),
            ("training time", f"{self.train_time_s / 60:.1f} min"),
            ("resumes", str(self.resumes)),
        ]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / run_layout.METRICS
    if not path.is_file():
        raise UsageError(f"{path}: no metrics (not a run directory, or the run logged nothing yet)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise UsageError(f"{path}:{number}: not JSON") from None
    return records


def summarize(records: list[dict[str, Any]]) -> Summary:
    steps = [r for r in records if "loss" in r]
    vals = [r for r in steps if r.get("val_loss") is not None]
    best = min(vals, key=lambda r: r["val_loss"]) if vals else None
    # Logged steps are a sample: each stands for the steps since the previous logged one.
    time_s, previous = 0.0, 0
    for r in steps:
        time_s += (r["step"] - previous) * r.get("step_time_s", 0.0)
        previous = r["step"]
    throughput = [r["tokens_per_s"] for r in steps[1:] or steps if r.get("tokens_per_s")]
    mfu = [r["mfu"] for r in steps[1:] or steps if r.get("mfu") is not None]
    return Summary(
        steps=steps[-1]["step"] if steps else 0,
        tokens_seen=steps[-1].get("tokens_seen", 0) if steps else 0,
        final_loss=steps[-1]["loss"] if steps else None,
        best_val_loss=best["val_loss"] if best else None,
        best_val_step=best["step"] if best else None,
        mean_tokens_per_s=sum(throughput) / len(throughput) if throughput else None,
        mean_mfu=sum(mfu) / len(mfu) if mfu else None,
        train_time_s=time_s,
        resumes=sum(1 for r in records if r.get("event") == "resume"),
        best_val_score=best_score(steps),
        downstream=last_downstream(steps),
    )


def last_downstream(steps: list[dict[str, Any]]) -> dict[str, tuple[float, float, int]]:
    """Each downstream task's last (acc, acc_norm, step)."""
    last = {}
    for name in downstream_names(steps):
        r = next(r for r in reversed(steps) if f"downstream/{name}/acc" in r)
        last[name] = (r[f"downstream/{name}/acc"], r[f"downstream/{name}/acc_norm"], r["step"])
    return last


def downstream_names(steps: list[dict[str, Any]]) -> list[str]:
    """The downstream tasks the run logged, in the order they first appear."""
    keys = (key for r in steps for key in r if key.startswith("downstream/") and key.endswith("/acc"))
    return list(dict.fromkeys(key.removeprefix("downstream/").removesuffix("/acc") for key in keys))


def best_score(steps: list[dict[str, Any]]) -> tuple[str, float, int] | None:
    for key in BEST_NAMES:
        scored = [r for r in steps if r.get(key) is not None]
        if scored:
            # The earliest step reaching the best value: the one a fine-tuning run keeps as its best checkpoint.
            top = max(scored, key=lambda r: (r[key], -r["step"]))
            return key, top[key], top["step"]
    return None


def plot(records: list[dict[str, Any]], title: str) -> bytes:
    """A PNG: loss and validation loss against tokens, learning rate, throughput, MFU against steps, and the
    downstream tasks' acc and acc_norm against tokens when the run scored any."""
    plt = pyplot()
    steps = [r for r in records if "loss" in r]
    vals = [r for r in steps if r.get("val_loss") is not None]
    tasks = downstream_names(steps)
    fig, axes = plt.subplots(3 if tasks else 2, 2, figsize=(11, 10.5 if tasks else 7))
    ax = axes[0][0]
    ax.plot([r["tokens_seen"] for r in steps], [r["loss"] for r in steps], label="train")
    if vals:
        ax.plot([r["tokens_seen"] for r in vals], [r["val_loss"] for r in vals], "o-", label="validation")
    ax.set(xlabel="tokens", ylabel="loss", title="loss")
    ax.legend()
    for ax, key, label in (
        (axes[0][1], "lr", "learning rate"),
        (axes[1][0], "tokens_per_s", "tokens/s (global)"),
        (axes[1][1], "mfu", "MFU"),
    ):
        points = [(r["step"], r[key]) for r in steps if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True))
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set(xlabel="step", title=label)
    for ax, metric in zip(axes[2] if tasks else [], ("acc", "acc_norm"), strict=False):
        for name in tasks:
            points = [(r["tokens_seen"], r[f"downstream/{name}/{metric}"]) for r in steps
                      if f"downstream/{name}/{metric}" in r]  # fmt: skip
            ax.plot(*zip(*points, strict=True), "o-", label=name)
        ax.set(xlabel="tokens", title=f"downstream {metric}")
        ax.legend()
    for r in records:
        if r.get("event") == "resume":
            for ax in (axes[0][1], axes[1][0], axes[1][1]):
                ax.axvline(r["step"], color="grey", linestyle=":", linewidth=1)
    fig.suptitle(title)
    return figure_png(fig)


def figure_png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_per_position(ax: Any, curves: dict[str, list[float]]) -> None:
    """Loss against the position in the window, on a log axis: where a model stops using more context."""
    for label, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, label=label)
    ax.set(xscale="log", xlabel="position in the window (tokens of context)", ylabel="loss",
           title="validation loss by position")  # fmt: skip
    ax.legend()


def plot_per_position(curves: dict[str, list[float]]) -> bytes:
    """A PNG of each curve's loss by position."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    draw_per_position(ax, curves)
    return figure_png(fig)


@dataclass(frozen=True)
class Compared:
    """One run of a comparison: its name, summary and what its start event and eval recorded."""

    name: str
    records: list[dict[str, Any]]
    summary: Summary
    parameters: int | None
    per_position: list[float] | None

    def row(self) -> list[str]:
        s = self.summary
        best_loss = "n/a" if s.best_val_loss is None else f"{s.best_val_loss:.4f}"
        perplexity = "n/a" if s.best_val_loss is None else f"{math.exp(min(s.best_val_loss, 50.0)):.2f}"
        score = "" if s.best_val_score is None else f"{BEST_NAMES[s.best_val_score[0]]} {s.best_val_score[1]:.4f}"
        return [self.name, "n/a" if self.parameters is None else f"{self.parameters / 1e6:.2f}M",
                f"{s.tokens_seen:,}", best_loss, perplexity, score or "-",
                "n/a" if s.mean_tokens_per_s is None else f"{s.mean_tokens_per_s:,.0f}",
                "n/a" if s.mean_mfu is None else f"{s.mean_mfu:.2%}"]  # fmt: skip


COMPARISON_COLUMNS = ["run", "parameters", "tokens", "best val loss", "val perplexity", "best score", "tokens/s",
                      "MFU"]  # fmt: skip


def compared(run_dir: Path) -> Compared:
    records = read_metrics(run_dir)
    if not any("loss" in r for r in records):
        raise UsageError(f"{run_dir / run_layout.METRICS}: no training steps logged yet")
    starts = [r["parameters"] for r in records if r.get("event") == "start" and "parameters" in r]
    curve_file = run_dir / run_layout.PER_POSITION
    curve = None
    if curve_file.is_file():
        try:
            curve = json.loads(curve_file.read_text())["per_position_loss"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UsageError(
                f"{curve_file}: not what `lmscale eval --per-position` writes (no per_position_loss)"
            ) from None
    return Compared(run_dir.name, records, summarize(records), starts[-1] if starts else None, curve)


def comparison_table(runs: list[Compared]) -> str:
    """The runs side by side, in aligned columns."""
    rows = [COMPARISON_COLUMNS, *(run.row() for run in runs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COMPARISON_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)  # fmt: skip


def comparison_figure(runs: list[Compared]) -> Any:
    """Training and validation loss against tokens for every run, one colour each, and the loss by position
    of the runs that have it."""
    plt = pyplot()
    curves = {run.name: run.per_position for run in runs if run.per_position is not None}
    fig, axes = plt.subplots(1, 3 if curves else 2, figsize=(16 if curves else 11, 4.5))
    for index, run in enumerate(runs):
        colour = f"C{index % 10}"
        steps = [r for r in run.records if "loss" in r]
        vals = [r for r in steps if r.get("val_loss") is not None]
        axes[0].plot([r["tokens_seen"] for r in steps], [r["loss"] for r in steps], color=colour, label=run.name)
        if vals:
            axes[1].plot([r["tokens_seen"] for r in vals], [r["val_loss"] for r in vals], "o-", color=colour,
                         label=run.name)  # fmt: skip
    axes[0].set(xlabel="tokens", ylabel="loss", title="training loss")
    axes[1].set(xlabel="tokens", ylabel="loss", title="validation loss")
    for ax in axes[:2]:
        ax.legend()
    if curves:
        draw_per_position(axes[2], curves)
    return fig


def write_comparison(run_dirs: list[Path], output: Path) -> str:
    """Write the runs' overlaid curves to ``output`` (.png or .html); returns the table."""
    names = [d.name for d in run_dirs]
    if len(set(names)) < len(names):
        raise UsageError(f"runs: two runs share the name {next(n for n in names if names.count(n) > 1)!r} "
                         "(the legend names runs by their directory)")  # fmt: skip
    runs = [compared(d) for d in run_dirs]
    table = comparison_table(runs)
    write_page(output, figure_png(comparison_figure(runs)), " vs ".join(names), f"<pre>{html.escape(table)}</pre>")
    return table


def write_page(output: Path, png: bytes, title: str, body: str) -> None:
    """A PNG, or an HTML page with ``body`` above the image."""
    if output.suffix == ".png":
        output.write_bytes(png)
    elif output.suffix == ".html":
        image = base64.b64encode(png).decode()
        output.write_text(
            f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<h1>{html.escape(title)}</h1>{body}"
            f'<img alt="training curves" src="data:image/png;base64,{image}">\n'
        )
    else:
        raise UsageError(f"--output {output}: expected a .png or .html file")


def write_report(run_dir: Path, output: Path) -> Summary:
    records = read_metrics(run_dir)
    summary = summarize(records)
    if not any("loss" in r for r in records):
        raise UsageError(f"{run_dir / 'metrics.jsonl'}: no training steps logged yet")
    png = plot(records, str(run_dir))
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary.rows())
    write_page(output, png, str(run_dir), f"<table>{table}</table>")
    return summary
