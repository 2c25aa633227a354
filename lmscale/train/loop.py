"""The training loop, readable top to bottom: step, evaluate, log, checkpoint, stop on request."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lmscale import run_layout
from lmscale.confusion import accuracy_and_macro_f1, confusion_counts
from lmscale.data.stream import stop_loader_workers
from lmscale.errors import LmscaleError
from lmscale.job.exit_codes import EXIT_INTERRUPTED, EXIT_PREEMPTED
from lmscale.job.lease import Lease
from lmscale.job.signals import INTERRUPT, NO_STOP, PREEMPTION, StopRequest
from lmscale.tasks import task_of
from lmscale.train import checkpoint, downstream, memory, seq2seq_validation
from lmscale.train.downstream import ScoredTask
from lmscale.train.engine import set_collective_timeout
from lmscale.train.metrics import MetricsLogger, open_step_log
from lmscale.train.plan import RunPlan
from lmscale.train.schedule import lr_at
from lmscale.train.seq2seq_validation import Seq2SeqValidation
from lmscale.train.spike import SpikeGuard
from lmscale.train.state import TrainState

log = logging.getLogger("lmscale")


# The loop's collectives keep their tensors on the engine's device: NCCL has no CPU tensors, and a GPU run
# whose loop handed it one would fail at its first step. On CPU ranks the device is the CPU and gloo runs them.


def reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over all ranks, on its device (no host sync)."""
    total = value.detach().float().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def mean_over_ranks(value: torch.Tensor) -> float:
    return reduce_mean(value).item()


def accuracy(hits: torch.Tensor) -> float:
    """Right predictions over predicted tokens, summed over all ranks, from a (right, predicted) tensor."""
    total = hits.clone()
    dist.all_reduce(total)
    right, predicted = total.tolist()
    return right / predicted if predicted else float("nan")


def gathered_union(names: set[str]) -> set[str]:
    """The union of every rank's ``names``. ``all_gather_object`` serialises through tensors on the current
    device of the process group's backend."""
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(names))
    return {name for part in gathered for name in part or ()}


@dataclass(frozen=True)
class Agreed:
    """What every rank learns at a sync step, from one all-reduce."""

    stop: int
    """The most pressing stop any rank was asked for (``signals.NO_STOP`` ...)."""
    shards_changed: bool
    """Some rank's loader skipped a corrupt shard the ranks have not agreed on yet."""
    nonfinite: bool
    """A step since the last sync had a non-finite loss or gradient norm on some rank."""


class Trainer:
    def __init__(
        self,
        plan: RunPlan,
        engine: Any,
        train_batches: Iterator[dict[str, Any]],
        eval_batches: Any,
        logger: MetricsLogger,
        state: TrainState,
        rank: int,
        run_dir: Path,
        flops_per_token: float,
        peak_flops: float | None,
        stop: StopRequest,
        spike_guard: SpikeGuard | None = None,
        loads_universal: bool = False,
        lease: Lease | None = None,
        downstream: list[ScoredTask] | None = None,
    ) -> None:
        self.plan, self.cfg, self.engine = plan, plan.cfg, engine
        self.lease = lease
        """The run directory's lease when this rank took it (rank 0 of ranks without an lmscale launcher)."""
        self.downstream = downstream or []
        """``trainer.downstream``'s multiple-choice tasks, loaded."""
        self.train_batches, self.eval_batches = train_batches, eval_batches
        self.logger, self.state, self.rank = logger, state, rank
        self.ckpt_dir = run_dir / run_layout.CHECKPOINTS
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.loads_universal = loads_universal
        """The engine was built to load universal checkpoints (an elastic resume): rollbacks load that form too."""
        self.rollbacks = 0
        self.walked_back = 0
        """Checkpoints (newest first) tried by rollbacks since the last save: the next rollback starts past them."""
        self.skipped_here: set[str] = set()  # corrupt shards this rank's loader workers skipped
        self.skipped_all = set(state.skipped_shards)  # ... and those of every rank, as last agreed
        self.stop = stop
        self.spike_guard = spike_guard
        self.spikes_logged = int(spike_guard.skipped) if spike_guard is not None else 0
        self.short_timeouts = False  # set after this job's first step (start-up may compile, load, fetch)
        self.key_log = None
        if self.cfg.data.log_sample_keys:
            key_dir = run_dir / run_layout.SAMPLE_KEYS
            self.key_log = open_step_log(key_dir / f"rank_{rank}.jsonl", state.step)
            if rank == 0:
                # Ranks beyond this world size (a resume on fewer ranks) keep only the steps they trained.
                for path in key_dir.glob("rank_*.jsonl"):
                    if int(path.stem.removeprefix("rank_")) >= plan.world_size:
                        open_step_log(path, state.step).close()
        self.device = engine.device
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        """A step since the last sync had a non-finite loss or gradient norm (kept on the device)."""
        self.start_window()
        self.task = task_of(self.cfg.model)
        """What a forward pass predicts and what validation scores."""
        self.seq2seq_validation: Seq2SeqValidation | None = None
        """A seq2seq fine-tune's references and decoding settings, read at its first validation."""

    def syncs_after(self, step: int) -> bool:
        """Whether the loop reads values back from the device after ``step``: on logging, evaluation and
        checkpoint steps and the last one. Between them a step makes no host sync of the loop's own, so a GPU
        never waits on Python between steps."""
        t, every_ckpt = self.cfg.trainer, self.cfg.checkpoint.every_steps
        return (
            step % self.cfg.logging.every_steps == 0
            or step == t.max_steps
            or bool(t.eval_every_steps and step % t.eval_every_steps == 0)
            or bool(every_ckpt and step % every_ckpt == 0)
            or any(step % task.config.every_steps == 0 for task in self.downstream)
        )

    def start_window(self) -> None:
        """Throughput is measured over the steps between two syncs (the device's work is only known to be done
        at a sync), leaving out the evaluation, logging and checkpoint that follow a sync."""
        self.window_started, self.window_first_step = time.perf_counter(), self.state.step
        self.window_data_wait = 0.0

    def train_step(self) -> tuple[dict[str, Any], Agreed] | None:
        """One optimizer step; at a sync step also its metrics and what the ranks agreed (one all-reduce)."""
        cfg, plan = self.cfg, self.plan
        lr = lr_at(self.state.step, cfg.optim.lr, cfg.schedule.warmup_steps, cfg.total_steps, cfg.schedule.min_lr_ratio)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        sync = self.syncs_after(self.state.step + 1)
        keys: list[str] = []
        loss_sum = torch.zeros((), device=self.device)
        # Right predictions are counted at sync steps only: selecting the scored positions is a host sync.
        hits = torch.zeros(2, device=self.device) if sync and self.task.accuracy_metric else None
        for micro in range(plan.grad_accum_steps):
            wait_started = time.perf_counter()
            batch = next(self.train_batches)
            self.window_data_wait += time.perf_counter() - wait_started
            keys.extend(batch["keys"])
            self.skipped_here.update(batch["skipped_shards"])
            loss = self.forward(batch["inputs"], hits)
            self.engine.backward(loss)
            loss_sum += loss.detach()
            if micro == plan.grad_accum_steps - 1 and self.spike_guard is not None:
                # The step's loss, known on the device before the optimizer runs (the spike guard judges it).
                self.spike_guard.begin_step(reduce_mean(loss_sum / plan.grad_accum_steps))
            self.engine.step()
        self.state.step += 1
        self.state.samples_seen += plan.global_batch_size
        self.state.tokens_seen += plan.tokens_per_step
        if self.key_log is not None:
            self.key_log.write(json.dumps({"step": self.state.step, "keys": keys}) + "\n")
        grad_norm = self.engine.get_global_grad_norm()
        self.note_nonfinite(loss_sum, grad_norm)
        if not sync:
            return None
        return self.read_back(loss_sum / plan.grad_accum_steps, hits, grad_norm, lr)

    def note_nonfinite(self, loss: torch.Tensor, grad_norm: torch.Tensor | float | None) -> None:
        """Remember, on the device, whether this step's loss or gradient norm was not finite."""
        bad = ~torch.isfinite(loss)
        if isinstance(grad_norm, torch.Tensor):
            bad = bad | ~torch.isfinite(grad_norm.to(bad.device))
        elif grad_norm is not None and not math.isfinite(grad_norm):
            bad = torch.ones_like(bad)
        self.nonfinite = self.nonfinite | bad

    def read_back(
        self, loss: torch.Tensor, hits: torch.Tensor | None, grad_norm: torch.Tensor | float | None, lr: float
    ) -> tuple[dict[str, Any], Agreed]:
        """The sync: one all-reduce (summed) of the loss, the right predictions, each rank's stop request,
        its unagreed skipped shards and its non-finite steps since the last sync, then the window's rates."""
        plan = self.plan
        counts = hits if hits is not None else torch.zeros(2, device=self.device)
        host = [float(self.stop.kind == INTERRUPT), float(self.stop.kind == PREEMPTION),
                float(not self.skipped_here <= self.skipped_all)]  # fmt: skip
        values = torch.cat([loss.detach().float().view(1), counts.float(), self.nonfinite.float().view(1),
                            torch.tensor(host, device=self.device)])  # fmt: skip
        dist.all_reduce(values)
        total_loss, right, predicted, nonfinite, interrupts, preemptions, changed = values.tolist()
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        now = time.perf_counter()
        steps = self.state.step - self.window_first_step
        window = max(now - self.window_started, 1e-9)
        tokens_per_s = plan.tokens_per_step * steps / window
        metric = self.task.accuracy_metric
        accuracy = {metric: right / predicted if predicted else float("nan")} if metric and hits is not None else {}
        metrics = {
            "loss": total_loss / plan.world_size,
            **accuracy,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_rank": tokens_per_s / plan.world_size,
            "samples_per_s": plan.global_batch_size * steps / window,
            "step_time_s": window / steps,
            "data_wait_frac": self.window_data_wait / window,
            "mfu": self.flops_per_token * tokens_per_s / (self.peak_flops * plan.world_size)
            if self.peak_flops
            else None,
            "memory_gb": memory.metric_gb(self.device),
            "tokens_seen": self.state.tokens_seen,
            "skipped_shards": len(self.skipped_all),
        }
        stop = PREEMPTION if preemptions else INTERRUPT if interrupts else NO_STOP
        return metrics, Agreed(stop=stop, shards_changed=bool(changed), nonfinite=bool(nonfinite))

    def report_skipped_shards(self, step: int, metrics: dict[str, Any]) -> None:
        """Corrupt shards are skipped inside loader workers, each warning once there; when some rank skipped one
        the others have not heard of, the ranks agree on the run's total, which goes into the metrics with an
        event naming the new ones."""
        union = gathered_union(self.skipped_here) | self.skipped_all
        new = sorted(union - self.skipped_all)
        self.skipped_all = union
        self.state.skipped_shards = sorted(union)
        metrics["skipped_shards"] = len(union)
        if new:
            self.logger.event(step, "skipped_shards", shards=new, total=len(union))

    def report_spikes(self, step: int, metrics: dict[str, Any]) -> None:
        """Steps the spike guard skipped, read from the device only when a step is logged."""
        if self.spike_guard is None:
            return
        skipped = int(self.spike_guard.skipped)
        metrics["skipped_spikes"] = skipped
        if skipped > self.spikes_logged:
            log.warning("step %d: %d loss or gradient-norm spikes skipped so far", step, skipped)
            self.logger.event(step, "skipped_spikes", new=skipped - self.spikes_logged, total=skipped)
            self.spikes_logged = skipped

    def forward(self, inputs: dict[str, torch.Tensor], hits: torch.Tensor | None) -> torch.Tensor:
        """The micro-batch's loss; for a masked LM or a classifier, adds (right predictions, predictions) to
        ``hits``."""
        on_device = {name: value.to(self.device, non_blocking=True) for name, value in inputs.items()}
        # With targets a model returns the predicted ids of the scored positions, in row-major order.
        predictions, loss = self.engine(**on_device)
        if hits is not None and self.task.accuracy_metric:
            with torch.no_grad():
                targets = on_device["targets"]
                scored = targets[targets != -100]
                hits[0] += (predictions == scored).sum()
                hits[1] += scored.numel()
        return loss

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.engine.eval()
        # Starting the validation loader draws from the global generator: without the fork, evaluating would
        # change the dropout masks of every later step, and a run's losses would depend on eval_every_steps.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            try:
                validators = {"loss": self.evaluate_lm, "classifier": self.evaluate_classifier,
                              "generation": self.evaluate_generation}  # fmt: skip
                return validators[self.task.validation]()
            finally:
                self.engine.train()

    @torch.no_grad()
    def score_downstream(self, step: int) -> dict[str, float]:
        """Collective: the downstream tasks due at ``step``, scored on every rank (no random draws)."""
        due = [task for task in self.downstream if step % task.config.every_steps == 0]
        if not due:
            return {}
        self.engine.eval()
        try:
            return {name: value for task in due for name, value in
                    downstream.score(task, self.engine, self.device, self.plan.seq_len, self.rank,
                                     self.plan.world_size).items()}  # fmt: skip
        finally:
            self.engine.train()

    def evaluate_lm(self) -> dict[str, float]:
        total = torch.zeros((), device=self.device)
        hits = torch.zeros(2, device=self.device)
        count = 0
        for batch in self.eval_batches:
            total += self.forward(batch["inputs"], hits).float()
            count += 1
        val_loss = mean_over_ranks(total / max(count, 1))
        result = {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0))}
        if self.task.accuracy_metric:
            result[f"val_{self.task.accuracy_metric}"] = accuracy(hits)
        return result

    def evaluate_classifier(self) -> dict[str, float]:
        """Loss, accuracy and macro-F1 over every validation example, from the ranks' summed confusion matrix."""
        classes = self.cfg.model.num_labels
        confusion = torch.zeros(classes, classes, device=self.device)
        loss_sum = torch.zeros((), device=self.device)
        for batch in self.eval_batches:
            inputs = {name: value.to(self.device) for name, value in batch["inputs"].items()}
            targets = inputs.pop("targets")
            logits, _ = self.engine(**inputs)
            scored = targets != -100
            loss_sum += F.cross_entropy(logits[scored].float(), targets[scored], reduction="sum")
            confusion += confusion_counts(targets[scored], logits[scored].argmax(-1), classes)
        dist.all_reduce(confusion)
        dist.all_reduce(loss_sum)
        val_accuracy, val_macro_f1 = accuracy_and_macro_f1(confusion)
        return {"val_loss": loss_sum.item() / confusion.sum().item(), "val_accuracy": val_accuracy,
                "val_macro_f1": val_macro_f1}  # fmt: skip

    def evaluate_generation(self) -> dict[str, float]:
        """A seq2seq fine-tune: loss, and BLEU and chrF of the outputs it writes, over every validation pair."""
        if self.seq2seq_validation is None:
            self.seq2seq_validation = Seq2SeqValidation.of_run(self.cfg)
        return seq2seq_validation.validate(self.seq2seq_validation, self.engine, self.eval_batches, self.device)

    @contextlib.contextmanager
    def long_collectives(self) -> Iterator[None]:
        """Saves and loads keep the ranks waiting on the slowest writer or reader: they get the start-up bound
        (``collective_timeout_minutes``), the steps around them the short one."""
        t = self.cfg.trainer
        set_collective_timeout(t.collective_timeout_minutes)
        try:
            yield
        finally:
            if self.short_timeouts:
                set_collective_timeout(t.step_timeout_minutes)

    def new_best(self, metrics: dict[str, Any]) -> bool:
        """Fine-tuning: this step's validation score (the task's ``best_metric``: accuracy, BLEU) beats every
        earlier one (its checkpoint is kept)."""
        value = metrics.get(self.task.best_metric) if self.task.best_metric else None
        if value is None or not math.isfinite(value):
            return False
        if self.state.best_val_score is not None and value <= self.state.best_val_score:
            return False
        self.state.best_val_score = value
        return True

    def save(self, best: bool = False) -> None:
        with self.long_collectives():
            self._save(best)

    def _save(self, best: bool) -> None:
        state = {
            **self.state.to_dict(),
            "world_size": self.plan.world_size,
            **({"spike_guard": self.spike_guard.state_dict()} if self.spike_guard is not None else {}),
            "config": self.cfg.to_dict(),
            "saved_at": time.time(),
        }
        keep = self.cfg.checkpoint
        tag = checkpoint.save(
            self.engine, self.ckpt_dir, self.state.step, state, self.rank, keep.keep_last, keep.keep_every_steps
        )
        self.walked_back = 0
        if best and self.rank == 0:
            checkpoint.mark_best(self.ckpt_dir, tag)
        self.logger.event(self.state.step, "checkpoint", tag=tag, **({"best": True} if best else {}))

    def roll_back(self, metrics: dict[str, Any]) -> None:
        """A step whose loss or gradient norm is not finite has poisoned the weights: restore a checkpoint's
        weights and optimizer state and train on from the current data position, so the batches since that
        checkpoint are skipped (the step count and schedule go on; no step repeats). The first rollback after
        a save goes to the latest checkpoint; if training diverges again before the next save, that checkpoint
        is suspect too and the next rollback walks back to the one before it."""
        step = self.state.step
        self.logger.event(step, "skipped_step", loss=metrics["loss"], grad_norm=metrics["grad_norm"])
        order = checkpoint.fallback_order(self.ckpt_dir)
        limit = self.cfg.trainer.max_rollbacks
        reason = None
        if not order:
            reason = "no checkpoint to roll back to"
        elif self.rollbacks >= limit:
            reason = f"trainer.max_rollbacks={limit} reached"
        elif self.walked_back >= len(order):
            reason = f"every checkpoint ({', '.join(order)}) led back to non-finite values"
        tag = None
        if reason is None:
            with self.long_collectives():
                tag, rejected = checkpoint.first_verified(self.ckpt_dir, order[self.walked_back :], self.rank)
            self.walked_back += len(rejected) + (tag is not None)
            for candidate, problem in rejected:
                self.logger.event(step, "checkpoint_rejected", tag=candidate, reason=problem)
        if tag is None:
            reason = reason or "no checkpoint passes verification"
            raise LmscaleError(
                f"step {step}: loss {metrics['loss']}, gradient norm {metrics['grad_norm']}: training diverged "
                f"({reason})"
            )
        with self.long_collectives():
            # Another world size has no per-rank random state to go back to: the generators go on.
            saved = checkpoint.restore(self.engine, self.ckpt_dir, tag, self.rank, self.loads_universal,
                                       self.spike_guard, rng=not self.loads_universal)  # fmt: skip
        self.rollbacks += 1
        skipped = self.state.samples_seen - saved["samples_seen"]
        log.warning(
            "step %d: non-finite loss or gradient norm: rolled back to %s, skipping %d samples", step, tag, skipped
        )
        self.logger.event(step, "rollback", tag=tag, to_step=saved["step"], skipped_samples=skipped)

    def close(self, exit_code: int) -> None:
        """Close everything this rank writes in the run directory (W&B records ``exit_code``), the lease last:
        the next job may start as soon as it is gone."""
        if self.key_log is not None:
            self.key_log.close()
        # Loader workers ignore SIGTERM (preemption is the rank's to handle), so the interpreter's exit, which
        # terminates and joins them, would wait forever on an error exit: stop them through their queues now.
        stop_loader_workers(self.train_batches)
        self.logger.close(exit_code)
        if self.lease is not None:
            self.lease.release()

    def stop_requested(self) -> int:
        """The stop every rank agrees on before the first step: the most pressing any rank was asked for."""
        value = torch.tensor(float(self.stop.kind), device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value.item())

    def stopped(self, step: int, stopping: int) -> int:
        self.logger.event(step, "preempted", signal=self.stop.signal_name or "peer rank")
        self.stop.settle()
        return EXIT_PREEMPTED if stopping == PREEMPTION else EXIT_INTERRUPTED

    def fit(self) -> int:
        cfg = self.cfg
        every_eval, every_ckpt = cfg.trainer.eval_every_steps, cfg.checkpoint.every_steps
        first_step, saved_step = self.state.step, -1
        if stopping := self.stop_requested():
            # Asked to stop while starting: nothing was trained since the checkpoint this job started from.
            return self.stopped(first_step, stopping)
        self.start_window()
        while self.state.step < cfg.trainer.max_steps:
            synced = self.train_step()
            if not self.short_timeouts:
                self.short_timeouts = True
                set_collective_timeout(cfg.trainer.step_timeout_minutes)
            if synced is None:
                continue
            metrics, agreed = synced
            step = self.state.step
            if agreed.shards_changed:
                self.report_skipped_shards(step, metrics)
            if agreed.nonfinite:
                self.logger.log(step, metrics)
                self.roll_back(metrics)
                self.start_window()
                continue
            if every_eval and step % every_eval == 0:
                metrics.update(self.evaluate())
            metrics.update(self.score_downstream(step))
            evaluated = any(name.startswith(("val_", "downstream/")) for name in metrics)
            if step % cfg.logging.every_steps == 0 or evaluated or step == cfg.trainer.max_steps:
                self.report_spikes(step, metrics)
                self.logger.log(step, metrics)
            best = self.new_best(metrics)
            if (every_ckpt and step % every_ckpt == 0) or agreed.stop or best:
                self.save(best)
                saved_step = step
            if agreed.stop:
                return self.stopped(step, agreed.stop)
            self.start_window()
        if self.state.step > first_step and saved_step != self.state.step:
            self.save()
        return 0
