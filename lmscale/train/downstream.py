"""Multiple-choice tasks scored while a causal LM trains (``trainer.downstream``), as ``lmscale eval --task``
scores them after export (``lmscale.choices``, lm-evaluation-harness's conventions).

Every rank scores a share of a task's requests (the choices of its examples): request ``i`` goes to rank
``i mod world_size``, and every rank runs the same number of forward passes of the same batch size (a short
share is filled up with repeats whose scores are dropped), as ZeRO-3 needs: each forward gathers the
parameters from every rank. One all-reduce then gives every rank every score.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tokenizers import Tokenizer

from lmscale.choices import Example, choice_result, loglikelihoods, read_task, task_requests
from lmscale.config import DownstreamTask

BATCH_SIZE = 16


@dataclass(frozen=True)
class ScoredTask:
    config: DownstreamTask
    examples: list[Example]
    requests: list[tuple[list[int], int]]


def load_tasks(tasks: list[DownstreamTask], tokenizer: Tokenizer, prefix_id: int) -> list[ScoredTask]:
    """The tasks' examples and requests, read once at start-up."""
    loaded = []
    for task in tasks:
        examples = read_task(Path(task.path))
        loaded.append(ScoredTask(task, examples, task_requests(tokenizer, examples, prefix_id)))
    return loaded


def rank_share(count: int, rank: int, world_size: int) -> tuple[list[int], int]:
    """(the request indices ``rank`` scores, how many of them are its own): every rank's list is as long."""
    mine = list(range(rank, count, world_size))
    per_rank = -(-count // world_size)
    return mine + [mine[0] if mine else 0] * (per_rank - len(mine)), len(mine)


def score(task: ScoredTask, engine: Any, device: torch.device, seq_len: int, rank: int,
          world_size: int) -> dict[str, float]:  # fmt: skip
    """Collective: ``downstream/<name>/acc`` and ``acc_norm`` on every rank."""
    indices, own = rank_share(len(task.requests), rank, world_size)
    mine = loglikelihoods(lambda ids: engine(ids)[0], device, [task.requests[i] for i in indices], seq_len,
                          BATCH_SIZE, progress=False)  # fmt: skip
    scores = torch.zeros(len(task.requests), dtype=torch.float64, device=device)
    scores[torch.tensor(indices[:own], dtype=torch.long, device=device)] = torch.tensor(
        mine[:own], dtype=torch.float64, device=device
    )
    dist.all_reduce(scores)
    result = choice_result(task.examples, scores.tolist())
    name = task.config.name
    return {f"downstream/{name}/acc": result.acc, f"downstream/{name}/acc_norm": result.acc_norm}
