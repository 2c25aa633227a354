"""``lmscale generate`` and ``lmscale eval``."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer

from lmscale import run_layout
from lmscale.data.tokenizer import end_token_id, load_tokenizer, special_token_ids
from lmscale.errors import LmscaleError, UsageError
from lmscale.hf.directory import load_hf_model
from lmscale.inference.generate import SamplingOptions, generate
from lmscale.tasks import task_of

if TYPE_CHECKING:
    from lmscale.inference.evaluate import EvalResult


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cmd_generate(args: argparse.Namespace) -> int:
    directory = Path(args.model)
    model, _ = load_hf_model(directory)
    how = task_of(model.cfg).generates
    if how is None:
        raise UsageError(f"{directory}: a {model.cfg.family} model does not generate text (lmscale eval scores it)")
    model.to(_device())
    tok = load_tokenizer(directory / "tokenizer.json")
    if how == "seq2seq":
        return generate_outputs(args, model, tok)
    eot = end_token_id(tok)
    prompts = [tok.encode(p, add_special_tokens=False).ids for p in args.prompt]
    if any(not p for p in prompts):
        raise UsageError("--prompt: an empty prompt has no tokens to continue")
    options = SamplingOptions(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    if options.temperature < 0 or (options.top_p is not None and not 0 < options.top_p <= 1):
        raise UsageError("--temperature must be >= 0 and --top-p in (0, 1]")
    streaming = len(prompts) == 1
    shown: list[int] = []
    printed = ""

    def stream(step: list[int | None]) -> None:
        nonlocal printed
        if step[0] is None:
            return
        shown.append(step[0])
        # Decode the whole continuation: a byte-level BPE token can end in the middle of a character.
        text = tok.decode(shown)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text

    if streaming:
        sys.stdout.write(args.prompt[0])
    try:
        outputs = generate(model, prompts, options, eot, on_tokens=stream if streaming else None)
    except ValueError as err:
        raise UsageError(f"--prompt: {err}") from None
    if streaming:
        sys.stdout.write(tok.decode(outputs[0])[len(printed) :] + "\n")
        return 0
    for prompt, output in zip(args.prompt, outputs, strict=True):
        print(f"=== {prompt}\n{prompt}{tok.decode(output)}\n")
    return 0


def generate_outputs(args: argparse.Namespace, model: torch.nn.Module, tok: Tokenizer) -> int:
    """An encoder-decoder's output for each input, greedy or by beam search."""
    from lmscale.inference.seq2seq import outputs

    try:
        generated = outputs(model, tok, args.prompt, args.num_beams, args.max_new_tokens)
    except ValueError as err:
        raise UsageError(f"--num-beams, --max-new-tokens: {err}") from None
    for text, output in zip(args.prompt, generated, strict=True):
        print(f"=== {text}\n{tok.decode(output, skip_special_tokens=False)}\n")
    return 0


def _model_of_run(run_dir: Path) -> torch.nn.Module:
    """A run's checkpoint (its best for a fine-tuning run, else its latest), consolidated in memory (this path
    imports DeepSpeed)."""
    from lmscale.config import from_dict
    from lmscale.export.export import find_checkpoint
    from lmscale.families import build_model
    from lmscale.models import load_checked
    from lmscale.train import checkpoint
    from lmscale.train.engine import consolidated_state_dict

    tag = find_checkpoint(run_dir, "auto")
    cfg = from_dict(checkpoint.read_state(run_dir / run_layout.CHECKPOINTS, tag)["config"])
    model = build_model(cfg.model)
    try:
        load_checked(model, consolidated_state_dict(str(run_dir / run_layout.CHECKPOINTS), tag), str(run_dir))
    except ValueError as err:
        raise LmscaleError(str(err)) from None
    return model.eval()


def cmd_eval(args: argparse.Namespace) -> int:
    from lmscale.inference import evaluate

    target = Path(args.model)
    model = _model_of_run(target) if (target / run_layout.CHECKPOINTS).is_dir() else load_hf_model(target)[0]
    tokenizer_file = target / "tokenizer.json"
    tok = load_tokenizer(tokenizer_file)
    model.to(_device())
    cfg = model.cfg
    task = task_of(cfg)
    if args.per_position and not task.scores_continuations:
        raise UsageError(f"--per-position: a {cfg.family} model does not predict each next token (a causal LM does)")
    if args.task is not None:
        return eval_choices(args, model, tok)
    if task.labelled:
        return eval_classifier(args, model, tokenizer_file, tok)
    if task.generates == "seq2seq" and len(args.data) == 1:
        from lmscale.inference.translation import is_pairs_file

        if is_pairs_file(args.data[0], args.source_field):
            return eval_translations(args, model, tok)
    if task.fine_tuning is not None:
        raise UsageError(f"--data: a model fine-tuned for {task.name} is scored on a .jsonl or .csv file of its "
                         f"examples ({args.source_field}/{args.target_field} pairs)")  # fmt: skip
    prepared = len(args.data) == 1 and evaluate.is_prepared(args.data[0])
    seq_len = cfg.seq_len
    if prepared:
        windows, seq_len = evaluate.prepared_windows(args.data[0], args.split, tok, task.name)
        if cfg.seq_len is not None and seq_len > cfg.seq_len:
            raise UsageError(f"--data: samples of {seq_len} tokens exceed the model's {cfg.seq_len} positions")
    elif cfg.seq_len is None:
        raise UsageError(f"--data: {args.model} does not say its input length: give a prepared dataset")
    elif task.wraps_documents:
        windows = evaluate.mlm_windows(args.data, tok, cfg.seq_len)
    else:
        windows = evaluate.text_windows(args.data, tok, task.sample_len(cfg.seq_len, None))
    if task.scores_continuations:  # a causal LM: every next token
        result = evaluate.evaluate(model, windows, args.batch_size, args.max_batches, args.per_position)
        print(f"loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  ({result.tokens:,} tokens)")
        if result.per_position is not None:
            write_per_position(args, target, result)
        return 0
    if task.masked and not 0 < args.mlm_probability < 1:
        raise UsageError(f"--mlm-probability {args.mlm_probability}: must be in (0, 1)")
    layout = TokenizerLayout(special_token_ids(tok), tok.get_vocab_size(), seq_len)
    collate = task.collator(layout, args.seed, args.mlm_probability, None)
    result = evaluate.evaluate_collated(model, windows, collate, args.batch_size, args.max_batches)
    accuracy = f"  {task.accuracy_metric} {result.accuracy:.4f}" if task.accuracy_metric else ""
    scored = f"{result.tokens:,} masked tokens, {args.mlm_probability:g} masked" if task.masked else (
        f"{result.tokens:,} target tokens")  # fmt: skip
    print(f"loss {result.loss:.4f}{accuracy}  perplexity {result.perplexity:.2f}  ({scored})")
    return 0


def write_per_position(args: argparse.Namespace, target: Path, result: EvalResult) -> None:
    """The loss at each position, as JSON (``lmscale report`` overlays it for a run) and as a plot."""
    import json

    from lmscale.report import plot_per_position

    curve = result.per_position
    assert curve is not None
    shown = sorted({1, *(4**k for k in range(1, 10) if 4**k < len(curve)), len(curve)})
    print("per position: " + "  ".join(f"{position} {curve[position - 1]:.3f}" for position in shown))
    path = args.json or target / run_layout.PER_POSITION
    record = {"model": str(target), "data": args.data, "split": args.split, "loss": result.loss,
              "perplexity": result.perplexity, "tokens": result.tokens, "per_position_loss": curve}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record) + "\n")
    path.with_suffix(".png").write_bytes(plot_per_position({str(target): curve}))
    print(f"wrote {path} and {path.with_suffix('.png')}")


def eval_translations(args: argparse.Namespace, model: torch.nn.Module, tok: Tokenizer) -> int:
    """BLEU and chrF (sacrebleu) of an encoder-decoder's outputs for the sources of a pairs file."""
    import json

    from lmscale.data.seq2seq import read_pairs
    from lmscale.inference.translation import translate_and_score

    pairs = read_pairs(args.data[0], args.source_field, args.target_field, "--data")
    try:
        hypotheses, result = translate_and_score(model, tok, pairs, args.num_beams, args.max_new_tokens,
                                                 args.batch_size)  # fmt: skip
    except ValueError as err:
        raise UsageError(f"--num-beams, --max-new-tokens: {err}") from None
    if args.outputs is not None:
        with open(args.outputs, "w", encoding="utf-8") as f:
            for source, target, output in zip(pairs.sources, pairs.targets, hypotheses, strict=True):
                f.write(json.dumps({"source": source, "target": target, "output": output}, ensure_ascii=False) + "\n")
    how = "greedy" if args.num_beams == 1 else f"{args.num_beams} beams"
    print(f"bleu {result.bleu:.2f}  chrf {result.chrf:.2f}  ({result.pairs:,} pairs, {how})")
    print(f"  {result.bleu_signature}\n  {result.chrf_signature}")
    return 0


@dataclass(frozen=True)
class TokenizerLayout:
    """What a task's collator reads of a dataset (``lmscale.tasks.SampleLayout``), from the model's tokenizer."""

    special_tokens: dict[str, int]
    vocab_size: int
    seq_len: int
    target_len: int | None = None


def eval_choices(args: argparse.Namespace, model: torch.nn.Module, tok: Tokenizer) -> int:
    """acc and acc_norm on a multiple-choice task, as lm-evaluation-harness scores it."""
    from lmscale.choices import read_task, score_task

    if not task_of(model.cfg).scores_continuations:
        raise UsageError(f"--task: a {model.cfg.family} model gives no likelihood of a continuation (a causal LM does)")
    examples = read_task(args.task)
    result = score_task(model, tok, examples, end_token_id(tok), args.batch_size)
    choices = sorted({len(e.choices) for e in examples})
    print(f"acc {result.acc:.4f}  acc_norm {result.acc_norm:.4f}  ({result.examples:,} examples, "
          f"{'/'.join(map(str, choices))} choices)")  # fmt: skip
    return 0


def eval_classifier(args: argparse.Namespace, model: torch.nn.Module, tokenizer_file: Path, tok: Tokenizer) -> int:
    """Accuracy and macro-F1 of a classifier on one file of labelled examples (the columns it was tuned on)."""
    from lmscale.data.labelled import Fields, encode_examples, read_examples
    from lmscale.inference.evaluate import evaluate_classifier

    if len(args.data) != 1:
        raise UsageError("--data: a classifier is scored on one .csv or .jsonl file of labelled examples")
    examples = read_examples(args.data[0], Fields(), "--data")
    rows = encode_examples(examples, tokenizer_file, model.cfg.labels, model.cfg.seq_len)
    result = evaluate_classifier(model, rows, special_token_ids(tok)["[PAD]"], args.batch_size)
    print(f"accuracy {result.accuracy:.4f}  macro_f1 {result.macro_f1:.4f}  loss {result.loss:.4f}  "
          f"({result.examples:,} examples)")  # fmt: skip
    return 0
