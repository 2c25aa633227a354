"""Checkpoints: DeepSpeed's ZeRO files plus lmscale's own state, published atomically.

Layout of ``<run>/checkpoints/``::

    step_00000020/            DeepSpeed files (model states, ZeRO optimizer partitions per rank)
        lmscale_state.json    step, tokens and samples seen (the data position), world size, config, wandb id
        rng/rank_<r>.pt       each rank's RNG states
    latest                    the newest complete tag, replaced by atomic rename after every rank finished

A tag directory without ``lmscale_state.json`` is incomplete (a save that was interrupted) and is ignored.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmscale.errors import LmscaleError, UsageError

STATE_FILE = "lmscale_state.json"
LATEST = "latest"
UNIVERSAL = "universal"
"""Sub-directory of a tag holding DeepSpeed's universal (world-size independent) form of the checkpoint."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags whose save finished, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and (p / STATE_FILE).is_file())


def latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if (ckpt_dir / tag / STATE_FILE).is_file():
            return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def resume_tag(ckpt_dir: Path, resume: str) -> str | None:
    """The tag ``--resume`` asks for: ``auto`` the latest complete one (None for a new run), ``none`` None but
    only for a run without checkpoints (it would overwrite them), else that tag, which must be complete."""
    if resume == "none":
        if latest_tag(ckpt_dir) is not None:
            raise UsageError(
                f"{ckpt_dir}: the run already has checkpoints; use --resume auto to continue it or another run.name"
            )
        return None
    if resume == "auto":
        return latest_tag(ckpt_dir)
    read_state(ckpt_dir, resume)
    return resume


def read_state(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    path = ckpt_dir / tag / STATE_FILE
    if not path.is_file():
        raise LmscaleError(f"{ckpt_dir / tag}: not a complete lmscale checkpoint (no {STATE_FILE})")
    return json.loads(path.read_text())


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine: Any, ckpt_dir: Path, step: int, state: dict[str, Any], rank: int, keep_last: int) -> str:
    """Collective: every rank calls it. Returns the tag."""
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    rng_dir = ckpt_dir / tag / "rng"
    rng_dir.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), rng_dir / f"rank_{rank}.pt")
    torch.distributed.barrier()
    if rank == 0:
        _write_atomic(ckpt_dir / tag / STATE_FILE, json.dumps(state, indent=2))
        _write_atomic(ckpt_dir / LATEST, tag)
        for old in complete_tags(ckpt_dir)[:-keep_last]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    torch.distributed.barrier()
    return tag


def convert_to_universal(ckpt_dir: Path, tag: str) -> None:
    """Rewrite a ZeRO checkpoint in DeepSpeed's universal format, which loads on any world size.

    Runs DeepSpeed's own converter (``deepspeed.checkpoint.ds_to_universal``) once per tag; the result
    is published by rename, so an interrupted conversion is redone, never half-used.
    """
    target = ckpt_dir / tag / UNIVERSAL
    if (target / "zero").is_dir():
        return
    tmp = ckpt_dir / tag / f".{UNIVERSAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    command = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", str(ckpt_dir / tag), "--output_folder", str(tmp),
        "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise LmscaleError(f"{ckpt_dir / tag}: conversion to a universal checkpoint failed ({last})")
    os.replace(tmp, target)


def load(engine: Any, ckpt_dir: Path, tag: str, rank: int, universal: bool = False) -> dict[str, Any]:
    """Collective: restore engine, optimizer and RNG; returns the lmscale state saved with the tag.

    ``universal`` loads the tag's universal form (after ``convert_to_universal``), for another world size;
    the engine must then have been built with ``checkpoint.load_universal``.
    """
    state = read_state(ckpt_dir, tag)
    load_dir, load_tag = (ckpt_dir / tag, UNIVERSAL) if universal else (ckpt_dir, tag)
    path, _ = engine.load_checkpoint(
        str(load_dir), tag=load_tag, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if path is None:
        raise LmscaleError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
    rng_file = ckpt_dir / tag / "rng" / f"rank_{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
