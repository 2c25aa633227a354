"""``lmscale export``: a ZeRO checkpoint (any stage, any world size) -> a Hugging Face model directory.

consolidate (DeepSpeed's zero_to_fp32) -> lmscale model -> the family's key table -> ``transformers`` model
(GPT-2, Llama, BertForMaskedLM, BertForSequenceClassification or T5ForConditionalGeneration) -> safetensors
(sharded above ``max_shard_size``) + ``config.json`` + tokenizer (+ generation config for a GPT) -> reload
with the matching auto class and compare logits with the lmscale model -> publish by rename.

A family ``transformers`` has no class for (the recurrent models) is written in the same layout under
lmscale's own names (``lmscale.hf.directory``), which ``lmscale generate``, ``lmscale eval`` and
``model.init_from`` load without DeepSpeed or a run directory; the check reloads it the same way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmscale import run_layout
from lmscale.config import from_dict
from lmscale.data.tokenizer import end_token_id, load_tokenizer, special_token_ids
from lmscale.errors import LmscaleError, UsageError
from lmscale.families import build_model, family_of
from lmscale.files import replacing
from lmscale.hf.convert import auto_class, hf_config_dict, tied_keys, to_hf
from lmscale.hf.directory import LMSCALE_MODEL, load_hf_model
from lmscale.models import ModelConfig, encoder_decoder_inputs, load_checked
from lmscale.progress import Progress
from lmscale.tasks import task_of
from lmscale.train import checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ExportResult:
    output: Path
    tag: str
    architecture: str
    max_abs_diff: float
    tolerance: float


def find_checkpoint(run_dir: Path, requested: str) -> str:
    """The verified tag ``requested`` names: a tag, ``latest``, ``best`` (a fine-tuning run's best validation
    accuracy) or ``auto`` (best if the run has one, else latest)."""
    ckpt_dir = run_dir / run_layout.CHECKPOINTS
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: run directory does not exist")
    best = checkpoint.best_tag(ckpt_dir)
    if requested == "best" and best is None:
        raise UsageError(f"--checkpoint best: {run_dir} has no best checkpoint (only fine-tuning runs keep one)")
    if requested in ("best", "auto") and best is not None:
        tag: str | None = best
    elif requested in ("latest", "auto"):
        tag = checkpoint.latest_tag(ckpt_dir)
    else:
        tag = checkpoint.named_tag(ckpt_dir, requested)
    if tag is None:
        raise LmscaleError(f"{run_dir}: no complete checkpoint to export")
    if problem := checkpoint.check_tag(ckpt_dir, tag):
        raise LmscaleError(f"checkpoint {tag} fails verification: {problem}")
    return tag


def tolerance(reference: torch.Tensor) -> float:
    """Both sides compute in fp32 from the same weights, so they differ only by kernel order: 1e-3 of the
    logits' scale (at least 1e-3) leaves room for that and none for a wrong key, transpose or norm."""
    return 1e-3 * max(1.0, reference.abs().max().item())


def parity_batch(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inputs both models run in the parity check: random tokens, in whatever form the family's model takes
    (an encoder's with a padded row, so the check covers the padding mask)."""
    generator = torch.Generator().manual_seed(0)
    assert cfg.vocab_size is not None and cfg.seq_len is not None
    idx = torch.randint(0, cfg.vocab_size, (2, min(cfg.seq_len, 64)), generator=generator)
    adapter = family_of(cfg).hf
    if adapter is not None:
        return adapter.parity_inputs(idx)
    return encoder_decoder_inputs(idx) if task_of(cfg).generates == "seq2seq" else {"idx": idx}


def save_tokenizer(tokenizer_file: Path, output: Path, cfg: ModelConfig) -> None:
    """The run's tokenizer as ``AutoTokenizer`` loads it, with the family's special tokens."""
    tok, special = family_of(cfg).hf.tokenizer(tokenizer_file, cfg)
    tok.save_pretrained(str(output))
    # Name the class every transformers version knows (v5 writes its new backend's name).
    config_path = output / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    (output / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def transformers_class(cfg: ModelConfig) -> Any:
    import transformers

    return getattr(transformers, auto_class(cfg))


def save_weights(state: dict[str, torch.Tensor], output: Path, max_shard_size: str) -> None:
    from huggingface_hub import save_torch_state_dict

    output.mkdir(parents=True, exist_ok=True)
    logging.disable(logging.INFO)  # huggingface_hub's "weights saved" line (on a logger of its file's path)
    try:
        save_torch_state_dict(state, str(output), max_shard_size=max_shard_size)
    finally:
        logging.disable(logging.NOTSET)


def write_model_dir(model: nn.Module, tokenizer_file: Path, output: Path, dtype: str, max_shard_size: str) -> str:
    """Write ``model`` as a Hugging Face directory, or lmscale's own where transformers has no class for its
    family; returns the architecture's name."""
    if family_of(model.cfg).hf is None:
        return write_lmscale_dir(model, tokenizer_file, output, dtype, max_shard_size)
    return write_hf_dir(model, tokenizer_file, output, dtype, max_shard_size)


def write_lmscale_dir(model: nn.Module, tokenizer_file: Path, output: Path, dtype: str, max_shard_size: str) -> str:
    """The weights under lmscale's names, the model section in ``config.json`` and the tokenizer file."""
    cfg = model.cfg
    # Every key, tied ones as copies of their own (safetensors stores no shared tensors), so that loading is
    # a plain state dict.
    save_weights({k: v.detach().to(DTYPES[dtype]).clone() for k, v in model.state_dict().items()}, output,
                 max_shard_size)  # fmt: skip
    architecture = f"lmscale {cfg.family} ({cfg.flavor})"
    config = {LMSCALE_MODEL: dataclasses.asdict(cfg), "architectures": [architecture], "torch_dtype": dtype}
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(tokenizer_file, output / "tokenizer.json")
    return architecture


def write_hf_dir(model: nn.Module, tokenizer_file: Path, output: Path, dtype: str, max_shard_size: str) -> str:
    """Write ``model`` as a Hugging Face directory; returns the transformers class name."""
    from transformers import AutoConfig, GenerationConfig

    cfg = model.cfg
    special_tokens = special_token_ids(load_tokenizer(tokenizer_file))
    config_dict = hf_config_dict(cfg, special_tokens)
    architecture = config_dict["architectures"][0]
    fields = {k: v for k, v in config_dict.items() if k not in ("model_type", "architectures")}
    hf_config = AutoConfig.for_model(config_dict["model_type"], **fields)
    hf_config.architectures = [architecture]
    with torch.device("meta"):  # the names transformers expects, without building its weights
        expected = set(transformers_class(cfg).from_config(hf_config).state_dict()) - tied_keys(cfg)
    state = to_hf({k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}, cfg)
    unmatched = sorted(expected ^ set(state))
    if unmatched:
        raise LmscaleError(f"conversion to {architecture} left weights unmatched: {unmatched[:3]}")
    # The tensors as they are, rather than through transformers' model, which ties weights its class always
    # ties (transformers 5 ties T5's head to the embedding) and would lose an untied head.
    save_weights(state, output, max_shard_size)
    hf_config.save_pretrained(str(output))
    # What lmscale trained, in the fields every transformers version reads the same way (transformers 5
    # writes T5's tie_word_embeddings as true whatever the head).
    written = json.loads((output / "config.json").read_text())
    (output / "config.json").write_text(json.dumps({**written, **config_dict}, indent=2) + "\n")
    if task_of(cfg).generates == "causal":  # an encoder-decoder's generation settings are in its config.json
        eot_id = end_token_id(load_tokenizer(tokenizer_file))
        GenerationConfig(bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id).save_pretrained(str(output))
    save_tokenizer(tokenizer_file, output, cfg)
    return architecture


HF_INPUTS = {"idx": "input_ids", "pad_mask": "attention_mask", "decoder_idx": "decoder_input_ids"}
"""transformers' names of the inputs a family's parity batch holds."""


def check_parity(model: nn.Module, output: Path, dtype: str) -> tuple[float, float]:
    """Max |logits difference| between the lmscale model and the reloaded export, and the tolerance.

    The check is of the conversion, not of the precision: the lmscale side uses its weights rounded to the
    export ``dtype`` as the files hold them, and both sides compute in fp32 (bf16 arithmetic would add
    rounding noise that grows with the weights and hide a small conversion error, or fail a correct one).
    """
    cfg = model.cfg
    rounded = build_model(cfg)
    rounded.load_state_dict({k: v.to(DTYPES[dtype]).float() for k, v in model.state_dict().items()})
    batch = parity_batch(cfg)
    with torch.no_grad():
        reference = rounded.eval()(**batch)[0]
        if family_of(cfg).hf is None:
            theirs = load_hf_model(output)[0](**batch)[0]
        else:
            exported = transformers_class(cfg).from_pretrained(str(output), dtype=torch.float32).eval()
            theirs = exported(**{HF_INPUTS[name]: value.long() for name, value in batch.items()}).logits
    return (theirs - reference).abs().max().item(), tolerance(reference)


def export_checkpoint(
    run_dir: Path,
    output: Path,
    requested: str = "auto",
    dtype: str = "fp32",
    overwrite: bool = False,
    max_shard_size: str = "5GB",
) -> ExportResult:
    from lmscale.train.engine import consolidated_state_dict

    if output.exists() and not overwrite:
        raise UsageError(f"{output}: output exists (pass --overwrite to replace it)")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the export's own bar counts its stages
    # Loading the export back for the parity check is the check itself: transformers' notes on how it ties
    # weights (T5 with an untied head) are not for the user.
    transformers_logging.set_verbosity_error()
    tag = find_checkpoint(run_dir, requested)
    state = checkpoint.read_state(run_dir / run_layout.CHECKPOINTS, tag)
    cfg = from_dict(state["config"])
    if (adapter := family_of(cfg.model).hf) is not None:
        adapter.check_exportable(cfg.model)
    tokenizer_file = run_dir / run_layout.TOKENIZER
    if not tokenizer_file.is_file():
        tokenizer_file = Path(cfg.data.resolved_sources()[0].path) / "tokenizer.json"

    with Progress("export", total=4, unit="stages") as progress, replacing(output) as tmp:
        try:
            weights = consolidated_state_dict(str(run_dir / run_layout.CHECKPOINTS), tag)
        except (FileNotFoundError, ValueError, KeyError, RuntimeError) as err:
            raise LmscaleError(
                f"{run_dir / run_layout.CHECKPOINTS / tag}: cannot consolidate the ZeRO files ({err})"
            ) from None
        progress.advance()
        model = build_model(cfg.model)
        try:
            load_checked(model, weights, str(run_dir / run_layout.CHECKPOINTS / tag))
        except ValueError as err:
            raise LmscaleError(str(err)) from None
        progress.advance()
        tmp.mkdir(parents=True)
        architecture = write_model_dir(model, tokenizer_file, tmp, dtype, max_shard_size)
        progress.advance()
        diff, tol = check_parity(model, tmp, dtype)
        progress.advance()
        if not diff <= tol:  # the directory is not published
            raise LmscaleError(
                f"{output}: exported {architecture} logits differ from lmscale's: "
                f"max |diff| {diff:.3g} > tolerance {tol:.3g}"
            )
    return ExportResult(output, tag, architecture, diff, tol)
