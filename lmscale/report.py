"""``lmscale report``: plots and a summary of a run, from its ``metrics.jsonl`` alone."""

from __future__ import annotations

import base64
import html
import io
import json
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_report(run_dir: Path, output: Path) -> Summary:
    records = read_metrics(run_dir)
    summary = summarize(records)
    if not any("loss" in r for r in records):
        raise UsageError(f"{run_dir / 'metrics.jsonl'}: no training steps logged yet")
    png = plot(records, str(run_dir))
    if output.suffix == ".png":
        output.write_bytes(png)
    elif output.suffix == ".html":
        table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary.rows())
        image = base64.b64encode(png).decode()
        output.write_text(
            f"<!doctype html><meta charset=utf-8><title>{html.escape(str(run_dir))}</title>"
            f"<h1>{html.escape(str(run_dir))}</h1><table>{table}</table>"
            f'<img alt="training curves" src="data:image/png;base64,{image}">\n'
        )
    else:
        raise UsageError(f"--output {output}: expected a .png or .html file")
    return summary
