"""Checkpoints: DeepSpeed's ZeRO files plus lmscale's own state, written durably, verified, published atomically.

Layout of ``<run>/checkpoints/``::

    step_00000020/            a complete tag: DeepSpeed files (model states, ZeRO optimizer partitions per rank)
        lmscale_state.json    step, tokens and samples seen (the data position), world size, config, wandb id
        rng/rank_<r>.pt       each rank's RNG states
        manifest.json         size and sha256 of every file above, written last
    .step_00000030.partial/   a save in progress, or one that a crash interrupted: removed at the next start
    latest                    the newest complete tag

A save is collective:

1. the ranks agree that it can succeed: the weights are finite, every rank can write the checkpoint directory,
   and its filesystem has room for a checkpoint the size of the previous one (a lower bound for the first);
2. DeepSpeed writes its files into ``.<tag>.partial``, each rank its RNG file;
3. the files are shared out among the ranks by size, and each rank fsyncs and hashes its share in parallel;
4. rank 0 writes the state file and the manifest, renames the directory to ``<tag>``, replaces ``latest``
   and rotates old tags, each step fsynced; the ranks agree that this worked.

A crash at any point leaves the earlier tags and ``latest`` as they were. Loading first verifies the tag against
its manifest, shared among the ranks the same way, every rank acting on the same verdict: ``--resume auto`` passes
over tags that fail (newest first, from ``latest`` down), a tag named with ``--resume`` must pass.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lmscale.errors import AgreedError, LmscaleError, UsageError, one_line
from lmscale.files import replacing, sync_dir, write_text
from lmscale.job.exit_codes import collective_failure
from lmscale.train.checkpoint_manifest import (
    MANIFEST,
    FileRecord,
    check_files,
    hash_files,
    list_files,
    read_manifest,
    share,
    write_manifest,
)
from lmscale.train.failpoints import reach

STATE_FILE = "lmscale_state.json"
LATEST = "latest"
BEST = "best"
"""Fine-tuning: the tag with the best validation accuracy, which rotation keeps."""
UNIVERSAL = "universal"
"""Sub-directory of a tag holding DeepSpeed's universal (world-size independent) form of the checkpoint."""
PARTIAL = ".partial"
TAG = re.compile(r"step_\d{8}")
FIRST_SAVE_BYTES_PER_PARAMETER = 12
"""The least any save writes per parameter (fp32 master copy and Adam's two moments): the room a first save
needs, before a previous checkpoint gives its real size."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def partial_dir(ckpt_dir: Path, tag: str) -> Path:
    return ckpt_dir / f".{tag}{PARTIAL}"


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags whose save finished (published under their name with a manifest), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if TAG.fullmatch(p.name) and (p / MANIFEST).is_file())


def latest_tag(ckpt_dir: Path) -> str | None:
    tags = complete_tags(ckpt_dir)
    latest = ckpt_dir / LATEST
    if latest.is_file() and (tag := latest.read_text().strip()) in tags:
        return tag
    return tags[-1] if tags else None


def fallback_order(ckpt_dir: Path) -> list[str]:
    """What ``--resume auto`` tries, newest first: ``latest`` and the tags before it. Tags after ``latest`` belong
    to a run that was resumed from an earlier tag: they are never resumed from (nor rotated away)."""
    latest = latest_tag(ckpt_dir)
    return [tag for tag in reversed(complete_tags(ckpt_dir)) if latest is not None and tag <= latest]


def resume_tag(ckpt_dir: Path, resume: str) -> str | None:
    """The tag ``--resume`` asks for, before verification: ``auto`` the latest complete one (None for a new run),
    ``none`` None but only for a run without checkpoints (it would overwrite them), else that tag, which must be
    one of the run's complete tags."""
    if resume == "none":
        if latest_tag(ckpt_dir) is not None:
            raise UsageError(
                f"{ckpt_dir}: the run already has checkpoints; use --resume auto to continue it or another run.name"
            )
        return None
    if resume == "auto":
        return latest_tag(ckpt_dir)
    return named_tag(ckpt_dir, resume)


def named_tag(ckpt_dir: Path, tag: str) -> str:
    """``tag`` if it names one of the run's complete checkpoints (nothing else: not a path), else a usage error
    listing them."""
    tags = complete_tags(ckpt_dir)
    if tag not in tags:
        known = ", ".join(tags) if tags else "none yet"
        raise UsageError(f"checkpoint {tag!r}: not a complete checkpoint of {ckpt_dir} (its tags: {known})")
    return tag


def read_state(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    path = ckpt_dir / tag / STATE_FILE
    if not path.is_file():
        raise LmscaleError(f"{ckpt_dir / tag}: not a complete lmscale checkpoint (no {STATE_FILE})")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise LmscaleError(f"{path}: unreadable ({err}); resume from another tag with --resume") from None


def remove_partial_saves(ckpt_dir: Path) -> list[str]:
    """Delete the saves a crash interrupted; returns their names. Run by one process before any rank saves."""
    removed = []
    for path in sorted(ckpt_dir.glob(f".*{PARTIAL}")) if ckpt_dir.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


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


def restore_rng(ckpt_dir: Path, tag: str, rank: int) -> None:
    """Put this rank's random generators where they were when ``tag`` was saved. Call it as the last thing before
    the next step: anything drawn after it (a data loader's seed, a benchmark) would shift dropout."""
    path = ckpt_dir / tag / "rng" / f"rank_{rank}.pt"
    if not path.is_file():
        raise LmscaleError(f"{path}: missing (rank {rank}'s random state; without it the resume is not exact)")
    set_rng_state(torch.load(path, weights_only=False))


def agree(problem: str | None, rank: int) -> None:
    """Collective: raise the first rank's problem (lowest rank) on every rank, or return when none has one."""
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problem)
    first = next((p for p in gathered if p), None)
    if first is not None:
        raise AgreedError(first, rank)


def save(
    engine: Any, ckpt_dir: Path, step: int, state: dict[str, Any], rank: int, keep_last: int, keep_every_steps: int
) -> str:
    """Collective: every rank calls it. Returns the tag."""
    tag = tag_for(step)
    partial = partial_dir(ckpt_dir, tag)
    problem = weights_problem(engine, step, rank)
    if rank == 0 and problem is None:
        problem = prepare_partial(engine, ckpt_dir, partial)
    agree(problem, rank)
    agree(probe_writable(partial / "rng", rank), rank)
    reach("save.begun", tag, rank)
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=partial.name, save_latest=False)
        torch.save(rng_state(), partial / "rng" / f"rank_{rank}.pt")
    except (OSError, RuntimeError) as err:
        if collective_failure(err) is not None:
            raise  # a peer died during the save: the rank's report of a lost peer, not a write error
        raise LmscaleError(f"{partial}: saving checkpoint {tag} failed: {write_failure(err, partial)}") from None
    reach("save.written", tag, rank)
    dist.barrier()
    shares: list[Any] = [share(list_files(partial), dist.get_world_size()) if rank == 0 else None]
    dist.broadcast_object_list(shares, src=0)
    records = hash_files(partial, shares[0][rank], sync=True)
    reach("save.hashed", tag, rank)
    gathered: list[list[FileRecord] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    problem = None
    if rank == 0:
        try:
            write_text(partial / STATE_FILE, json.dumps(state, indent=2), durable=True)
            every = [r for part in gathered for r in part or []] + hash_files(partial, [STATE_FILE], sync=False)
            write_manifest(partial, every, step)
            reach("save.manifest", tag, rank)
            publish(ckpt_dir, partial, tag)
            reach("save.published", tag, rank)
            rotate(ckpt_dir, tag, keep_last, keep_every_steps)
        except OSError as err:
            problem = f"{partial}: publishing checkpoint {tag} failed: {write_failure(err, partial)}"
    agree(problem, rank)
    return tag


def weights_problem(engine: Any, step: int, rank: int) -> str | None:
    """Refuse to save weights that are not finite: no run could continue from them. Under ZeRO-3 each rank checks
    its partition (``ds_tensor``), else the whole module."""
    for name, param in engine.module.named_parameters():
        if not torch.isfinite(getattr(param, "ds_tensor", param).detach()).all():
            return f"step {step}: parameter {name} is not finite on rank {rank}; not saving it as a checkpoint"
    return None


def prepare_partial(engine: Any, ckpt_dir: Path, partial: Path) -> str | None:
    """On rank 0: a fresh directory for the save, and room for it on the filesystem; else why not."""
    previous = latest_tag(ckpt_dir)
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        free = shutil.disk_usage(ckpt_dir).free
        if previous is not None:
            needed = sum(r.size for r in read_manifest(ckpt_dir / previous).values())
        else:
            parameters = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
            needed = parameters * FIRST_SAVE_BYTES_PER_PARAMETER
    except (OSError, ValueError) as err:
        return f"{partial}: cannot save a checkpoint there: {one_line(err, limit=300)}"
    if free < needed:
        shutil.rmtree(partial, ignore_errors=True)
        size = f"as large as {previous}" if previous else "for the first checkpoint"
        return (
            f"{ckpt_dir}: no space left for a checkpoint: {free / 1e6:.1f} MB free, {needed / 1e6:.1f} MB needed "
            f"({size}); free space or lower checkpoint.keep_last"
        )
    return None


def probe_writable(directory: Path, rank: int) -> str | None:
    """Each rank writes and syncs a small file where it will save: a read-only mount or a quota on any node shows
    up here, before DeepSpeed's collectives start."""
    probe = directory / f".probe_rank_{rank}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_text(probe, "probe", durable=True)
        probe.unlink()
    except OSError as err:
        return f"{directory}: rank {rank} cannot write its checkpoint files: {one_line(err, limit=300)}"
    return None


def write_failure(err: BaseException, where: Path) -> str:
    """Why a write failed. torch's serialiser reports a full disk as "unexpected pos" or "file write failed":
    a filesystem with (almost) nothing left is named as such."""
    try:
        free = shutil.disk_usage(where.parent).free
    except OSError:
        free = None
    if free is not None and free < 1 << 20:
        return f"no space left on the device ({free / 1e6:.1f} MB free)"
    return one_line(err, limit=300)


def publish(ckpt_dir: Path, partial: Path, tag: str) -> None:
    """Rename the finished save into place and point ``latest`` at it. A tag of that name from before a fallback
    or an explicit ``--resume`` of an earlier tag is replaced."""
    final = ckpt_dir / tag
    replaced = ckpt_dir / f".{tag}.replaced{PARTIAL}"
    if final.exists():
        final.rename(replaced)
    sync_dir(partial)
    partial.rename(final)
    sync_dir(ckpt_dir)
    reach("save.renamed", tag, 0)  # only rank 0 publishes
    write_text(ckpt_dir / LATEST, tag, durable=True)
    shutil.rmtree(replaced, ignore_errors=True)


def rotate(ckpt_dir: Path, saved: str, keep_last: int, keep_every_steps: int) -> None:
    """Keep the ``keep_last`` newest tags up to the one just saved, milestones every ``keep_every_steps``, and
    the best one."""
    older = [tag for tag in complete_tags(ckpt_dir) if tag <= saved]
    best = best_tag(ckpt_dir)
    for tag in older[:-keep_last]:
        if tag != best and not (keep_every_steps and int(tag.removeprefix("step_")) % keep_every_steps == 0):
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def mark_best(ckpt_dir: Path, tag: str) -> None:
    write_text(ckpt_dir / BEST, tag, durable=True)


def best_tag(ckpt_dir: Path) -> str | None:
    """The tag ``best`` names, if it is complete."""
    path = ckpt_dir / BEST
    tag = path.read_text().strip() if path.is_file() else None
    return tag if tag in complete_tags(ckpt_dir) else None


def check_tag(ckpt_dir: Path, tag: str, part: int = 0, parts: int = 1) -> str | None:
    """The first problem in share ``part`` of ``parts`` of ``tag``'s files (missing, resized, changed), as one
    line naming the file; None when that share matches the manifest. One process checks all of it alone."""
    try:
        expected = read_manifest(ckpt_dir / tag)
    except ValueError as err:
        return str(err)
    mine = share([(r.path, r.size) for r in expected.values()], parts)[part]
    return check_files(ckpt_dir / tag, [expected[name] for name in mine])


def verify(ckpt_dir: Path, tag: str, rank: int) -> str | None:
    """Collective: check ``tag`` against its manifest, each rank a share of the bytes; every rank gets the same
    verdict, the lowest rank's problem, or None."""
    try:
        agree(check_tag(ckpt_dir, tag, rank, dist.get_world_size()), rank)
    except AgreedError as err:
        return str(err)
    return None


def choose(ckpt_dir: Path, resume: str, rank: int) -> tuple[str | None, list[tuple[str, str]]]:
    """Collective: the verified tag this start resumes from (None: a new run), and the tags passed over on the
    way with the reason. A tag named with ``--resume`` that fails is an error; ``auto`` tries older tags."""
    requested = resume_tag(ckpt_dir, resume)
    if requested is None:
        return None, []
    order = fallback_order(ckpt_dir) if resume == "auto" else [requested]
    tag, rejected = first_verified(ckpt_dir, order, rank)
    if tag is not None:
        return tag, rejected
    if resume != "auto":
        raise AgreedError(f"checkpoint {requested} fails verification: {rejected[0][1]}", rank)
    reasons = "; ".join(f"{tag}: {problem}" for tag, problem in rejected)
    raise AgreedError(f"{ckpt_dir}: no checkpoint passes verification ({reasons})", rank)


def first_verified(ckpt_dir: Path, order: list[str], rank: int) -> tuple[str | None, list[tuple[str, str]]]:
    """Collective: the first of ``order`` that passes verification (None if none does), and those before it
    with the reason each failed."""
    rejected: list[tuple[str, str]] = []
    for tag in order:
        problem = verify(ckpt_dir, tag, rank)
        if problem is None:
            return tag, rejected
        rejected.append((tag, problem))
    return None, rejected


def restore(
    engine: Any, ckpt_dir: Path, tag: str, rank: int, universal: bool, spike_guard: Any = None, rng: bool = False
) -> dict[str, Any]:
    """Collective, for start-up and rollback alike: the engine, optimizer and spike guard as verified ``tag``
    saved them; returns the lmscale state saved with it (the caller decides the data position: a start goes
    on from the checkpoint's, a rollback from where it was).

    ``universal``: from the tag's universal form, for another world size (rank 0 converts it once). ``rng``:
    also this rank's random generators; a start restores them as its last step instead (``restore_rng``),
    since building its loaders draws from them."""
    if universal:
        if rank == 0:
            convert_to_universal(ckpt_dir, tag)
        dist.barrier()
    saved = load(engine, ckpt_dir, tag, universal=universal)
    if spike_guard is not None and "spike_guard" in saved:
        spike_guard.load_state_dict(saved["spike_guard"])
    if rng:
        restore_rng(ckpt_dir, tag, rank)
    return saved


def convert_to_universal(ckpt_dir: Path, tag: str) -> None:
    """Rewrite a ZeRO checkpoint in DeepSpeed's universal format, which loads on any world size.

    Runs DeepSpeed's own converter (``deepspeed.checkpoint.ds_to_universal``) once per tag; the result
    is published by rename, so an interrupted conversion is redone, never half-used.
    """
    target = ckpt_dir / tag / UNIVERSAL
    if (target / "zero").is_dir():
        return
    with replacing(target) as tmp:
        command = [
            sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
            "--input_folder", str(ckpt_dir / tag), "--output_folder", str(tmp),
            "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise LmscaleError(
                f"{ckpt_dir / tag}: conversion to a universal checkpoint failed ({one_line(result.stderr)})"
            )


def load(engine: Any, ckpt_dir: Path, tag: str, universal: bool = False) -> dict[str, Any]:
    """Collective: restore engine and optimizer from a verified tag; returns the lmscale state saved with it.
    The random state is restored separately (``restore_rng``), just before training goes on.

    ``universal`` loads the tag's universal form (after ``convert_to_universal``), for another world size;
    the engine must then have been built with ``checkpoint.load_universal``.
    """
    state = read_state(ckpt_dir, tag)
    load_dir, load_tag = (ckpt_dir / tag, UNIVERSAL) if universal else (ckpt_dir, tag)
    try:
        path, _ = engine.load_checkpoint(
            str(load_dir), tag=load_tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
    except (OSError, RuntimeError, EOFError, AssertionError, pickle.UnpicklingError) as err:
        raise LmscaleError(f"{ckpt_dir / tag}: DeepSpeed could not load it ({one_line(err, limit=300)})") from None
    if path is None:
        raise LmscaleError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
    return state
