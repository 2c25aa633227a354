"""The training state besides the engine's: what a resume needs to go on where the run stopped, saved with
every checkpoint as ``lmscale_state.json`` (with the world size, the resolved config and the spike guard's
window beside it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

RENAMED = {"best_val_accuracy": "best_val_score"}
"""Fields under the names checkpoints written before the rename use."""


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0
    """Global data position: samples consumed by all ranks. Independent of the world size."""
    tokens_seen: int = 0
    wandb_id: str = ""
    resumes: int = 0
    skipped_shards: list[str] = field(default_factory=list)
    """Corrupt shards skipped so far in the run, by every rank, as the ranks last agreed."""
    best_val_score: float | None = None
    """Fine-tuning: the best value so far of the task's ``best_metric`` (validation accuracy, BLEU), whose
    checkpoint ``checkpoints/best`` names."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainState:
        """The state a checkpoint saved; a field an older checkpoint lacks keeps its default."""
        names = {f.name for f in dataclasses.fields(cls)}
        saved = {RENAMED.get(name, name): value for name, value in saved.items()}
        return cls(**{name: value for name, value in saved.items() if name in names})
