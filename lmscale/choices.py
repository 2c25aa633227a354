"""Multiple-choice tasks scored by log-likelihood, with lm-evaluation-harness's conventions, so that a number
lmscale prints is the number ``lm_eval`` prints for the same file and model.

A task is a JSONL file of ``{"context": str, "choices": [str, ...], "label": int}``. Each choice is scored by
the summed log-probability of its tokens after the context, the two joined by a space (lm-eval's default
``target_delimiter``). As lm-eval's Hugging Face model does: whitespace that ends the context moves to the
front of the continuation; the context and the whole string are encoded without special tokens, and the
continuation is the whole's tokens past the context's; a request longer than the model's positions keeps its
last ``seq_len + 1`` tokens. ``acc`` picks the choice of the highest log-likelihood, ``acc_norm`` the highest
per character of the choice.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from lmscale.errors import UsageError
from lmscale.models.gpt import GPT
from lmscale.progress import Progress

TARGET_DELIMITER = " "


@dataclass(frozen=True)
class Example:
    context: str
    choices: list[str]
    label: int


@dataclass(frozen=True)
class ChoiceResult:
    acc: float
    acc_norm: float
    examples: int
    loglikelihoods: list[list[float]]
    """Per example, each choice's summed log-likelihood."""


def read_task(path: Path) -> list[Example]:
    """The examples of a task file; a row that does not fit fails in one line naming the file and line."""
    if not path.is_file():
        raise UsageError(f"--task {path}: file not found")
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{where}: not JSON ({err.msg})") from None
        fields = row if isinstance(row, dict) else {}
        context, choices, label = fields.get("context"), fields.get("choices"), fields.get("label")
        if not isinstance(context, str):
            raise UsageError(f"{where}: 'context' must be a string")
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)):
            raise UsageError(f"{where}: 'choices' must be a list of at least two strings")
        if not (isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(choices)):
            raise UsageError(f"{where}: 'label' must be the index of the right choice (0 to {len(choices) - 1})")
        examples.append(Example(context, choices, label))
    if not examples:
        raise UsageError(f"--task {path}: holds no examples")
    return examples


def request_tokens(tokenizer: Tokenizer, context: str, choice: str, prefix_id: int) -> tuple[list[int], int]:
    """(context and continuation tokens, how many of them are the continuation), as lm-eval encodes a pair."""
    continuation = TARGET_DELIMITER + choice
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False).ids
    # An empty context is the end-of-text token, which conditions the first token of the continuation.
    context_ids = tokenizer.encode(context, add_special_tokens=False).ids if context else []
    continuation_ids = whole[len(context_ids) :]
    return ([prefix_id] if not context else context_ids) + continuation_ids, len(continuation_ids)


Forward = Callable[[torch.Tensor], torch.Tensor]
"""Token ids (B, T) -> logits (B, T, vocab): a model, or a training engine's module under ZeRO."""


@torch.no_grad()
def loglikelihoods(forward: Forward, device: torch.device, requests: list[tuple[list[int], int]], seq_len: int,
                   batch_size: int, progress: bool = True) -> list[float]:  # fmt: skip
    """Each request's summed log-probability of its continuation, in batches (right-padded) of ``batch_size``:
    ``ceil(len(requests) / batch_size)`` forward passes, whatever the requests."""
    scores: list[float] = []
    bar = Progress("score", total=-(-len(requests) // batch_size), unit="batches") if progress else None
    for first in range(0, len(requests), batch_size):
        batch = [(tokens[-(seq_len + 1) :], n) for tokens, n in requests[first : first + batch_size]]
        width = max(len(tokens) for tokens, _ in batch) - 1
        inputs = np.zeros((len(batch), width), dtype=np.int64)
        for row, (tokens, _) in enumerate(batch):
            inputs[row, : len(tokens) - 1] = tokens[:-1]
        logprobs = torch.log_softmax(forward(torch.from_numpy(inputs).to(device)).float(), dim=-1)
        for row, (tokens, n) in enumerate(batch):
            end = len(tokens) - 1
            targets = torch.tensor(tokens[-n:], device=device)
            scores.append(float(logprobs[row, end - n : end].gather(-1, targets[:, None]).sum()))
        if bar is not None:
            bar.advance()
    if bar is not None:
        bar.close()
    return scores


def task_requests(tokenizer: Tokenizer, examples: list[Example], prefix_id: int) -> list[tuple[list[int], int]]:
    """Every choice of every example as a request, example by example."""
    return [request_tokens(tokenizer, e.context, choice, prefix_id) for e in examples for choice in e.choices]


def choice_result(examples: list[Example], flat: list[float]) -> ChoiceResult:
    """acc and acc_norm from the log-likelihoods of ``task_requests``' requests."""
    per_example, right, right_norm, at = [], 0, 0, 0
    for example in examples:
        lls = np.asarray(flat[at : at + len(example.choices)])
        at += len(example.choices)
        lengths = np.asarray([float(len(choice)) for choice in example.choices])
        right += int(np.argmax(lls) == example.label)
        right_norm += int(np.argmax(lls / lengths) == example.label)
        per_example.append(lls.tolist())
    return ChoiceResult(right / len(examples), right_norm / len(examples), len(examples), per_example)


def score_task(model: GPT, tokenizer: Tokenizer, examples: list[Example], prefix_id: int,
               batch_size: int = 16) -> ChoiceResult:  # fmt: skip
    """acc and acc_norm of ``model`` on the examples."""
    device = next(model.parameters()).device
    flat = loglikelihoods(lambda ids: model(ids)[0], device, task_requests(tokenizer, examples, prefix_id),
                          model.cfg.seq_len, batch_size)  # fmt: skip
    return choice_result(examples, flat)
