"""Validation of a sequence-to-sequence fine-tune: every validation pair's output written by the model (greedy,
or beam search with ``finetune.num_beams``) on the rank its micro-batch went to, gathered, and scored with
sacrebleu against the references as written (BLEU and chrF), beside the loss of the references themselves.

Every rank runs the same number of forward passes, as ZeRO-3 needs (each gathers the partitioned parameters
from all ranks): the validation stream gives each rank as many micro-batches, filling the last ones with
repeats that count for nothing, and decoding steps until every rank's batch is done.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tokenizers import Tokenizer

from lmscale.bleu import score
from lmscale.config import Config
from lmscale.data.seq2seq import read_references
from lmscale.data.tokenizer import T5_EOS, T5_PAD, load_tokenizer
from lmscale.models.seq2seq_search import Agree, decode


@dataclass(frozen=True)
class Seq2SeqValidation:
    references: list[str]
    """The validation targets, by their index in the validation file."""
    tokenizer: Tokenizer
    num_beams: int
    max_new_tokens: int
    bleu_tokenize: str

    @classmethod
    def of_run(cls, cfg: Config) -> Seq2SeqValidation:
        """What the fine-tune's prepared examples (``data.path``) and its ``finetune`` section say."""
        assert cfg.finetune is not None and cfg.data.path is not None and cfg.model.target_len is not None
        dataset = Path(cfg.data.path)
        return cls(read_references(dataset), load_tokenizer(dataset / "tokenizer.json"), cfg.finetune.num_beams,
                   cfg.model.target_len, cfg.finetune.bleu_tokenize)  # fmt: skip


def everyone_done(device: torch.device) -> Agree:
    """Whether every rank is done: one all-reduce of this rank's answer."""

    def agree(done: bool) -> bool:
        running = torch.tensor(0 if done else 1, device=device)
        dist.all_reduce(running)
        return int(running.item()) == 0

    return agree


def gathered(outputs: dict[int, list[int]]) -> dict[int, list[int]]:
    """Every rank's outputs by example (each example was written by one rank; repeats agree)."""
    parts: list[dict[int, list[int]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, outputs)
    return {example: ids for part in parts for example, ids in (part or {}).items()}


@torch.no_grad()
def validate(validation: Seq2SeqValidation, engine: Any, batches: Any, device: torch.device) -> dict[str, float]:
    """Collective: val_loss, val_perplexity, val_bleu and val_chrf over every validation pair."""
    tok = validation.tokenizer
    eos, pad = tok.token_to_id(T5_EOS), tok.token_to_id(T5_PAD)
    agree = everyone_done(device)
    loss_sum = torch.zeros((), device=device)
    scored = torch.zeros((), device=device)
    outputs: dict[int, list[int]] = {}
    for batch in batches:
        inputs = {name: value.to(device) for name, value in batch["inputs"].items()}
        example_ids = inputs.pop("example_ids").tolist()
        _, loss = engine(**inputs)
        count = (inputs["targets"] != -100).sum()
        loss_sum += loss.float() * count
        scored += count
        sources = [ids[mask].tolist() for ids, mask in zip(inputs["idx"], inputs["pad_mask"], strict=True)]
        # Through the engine, whose forward under ZeRO-3 gathers what each step reads (its attributes are the
        # model's).
        written = decode(engine, sources, validation.num_beams, validation.max_new_tokens, eos, pad, agree)
        outputs.update((example, ids) for example, ids in zip(example_ids, written, strict=True) if example >= 0)
    dist.all_reduce(loss_sum)
    dist.all_reduce(scored)
    everything = gathered(outputs)
    missing = [i for i in range(len(validation.references)) if i not in everything]
    assert not missing, f"validation wrote no output for pair {missing[0]}"
    hypotheses = [tok.decode(everything[i], skip_special_tokens=True) for i in range(len(validation.references))]
    result = score(hypotheses, validation.references, validation.bleu_tokenize)
    val_loss = loss_sum.item() / max(scored.item(), 1)
    return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0)), "val_bleu": result.bleu,
            "val_chrf": result.chrf}  # fmt: skip
