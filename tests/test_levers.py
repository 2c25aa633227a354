"""Activation checkpointing and compiled blocks: the same losses as a plain run, checkpoints that resume across
the settings, and the parameter names untouched."""

import shutil
from pathlib import Path

import pytest
import torch

from lmscale.models.bert import Bert, BertConfig
from lmscale.models.gpt import GPT, GPTConfig
from lmscale.train.levers import apply_activation_checkpointing, recomputed_blocks

from .conftest import FORTY_STEPS, losses, metrics_records, run_cli, run_here
from .distributed import train_in_process


def start_events(run_dir: Path) -> list[dict]:
    return [r for r in metrics_records(run_dir) if r.get("event") == "start"]


def test_the_setting_names_the_recomputed_blocks() -> None:
    assert recomputed_blocks("none", 6) == []
    assert recomputed_blocks("full", 6) == [0, 1, 2, 3, 4, 5]
    assert recomputed_blocks(1, 6) == [0, 1, 2, 3, 4, 5]
    assert recomputed_blocks(2, 6) == [0, 2, 4]
    assert recomputed_blocks(4, 6) == [0, 4]


MODELS = {
    "gpt2": lambda: GPT(GPTConfig(vocab_size=97, seq_len=32, d_model=32, n_layers=3, n_heads=4, dropout=0.2)),
    "llama": lambda: GPT(
        GPTConfig(
            flavor="llama", vocab_size=97, seq_len=32, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, dropout=0.2
        )
    ),
    "bert": lambda: Bert(BertConfig(vocab_size=97, seq_len=32, d_model=32, n_layers=3, n_heads=4, dropout=0.2)),
}


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("setting", ["full", 2])
def test_recomputation_draws_the_same_dropout_masks_loss_and_gradients_bit_for_bit(family: str, setting) -> None:
    plain, recomputing = MODELS[family](), MODELS[family]()
    recomputing.load_state_dict(plain.state_dict())
    names = list(recomputing.state_dict())
    assert apply_activation_checkpointing(recomputing, setting) == recomputed_blocks(setting, 3)
    assert list(recomputing.state_dict()) == names  # checkpoints are interchangeable
    idx = torch.randint(5, 97, (2, 32), generator=torch.Generator().manual_seed(1))
    targets = torch.where(torch.rand(2, 32, generator=torch.Generator().manual_seed(2)) < 0.3, idx, -100)
    results = []
    for model in (plain, recomputing):
        torch.manual_seed(7)
        _, loss = model.train()(idx, targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for name, grad in grads_a.items():
        assert torch.equal(grad, grads_b[name]), name
    # Evaluation and generation run the block as it is: no recomputation without gradients.
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(idx)[0], recomputing.eval()(idx)[0], rtol=0, atol=0)


def test_compiling_blocks_keeps_every_parameter_name() -> None:
    model = MODELS["llama"]()
    names = list(model.state_dict())
    for block in model.blocks:
        block.compile()
    assert list(model.state_dict()) == names and next(n for n, _ in model.named_parameters()) == "tok_emb.weight"


@pytest.mark.slow
def test_activation_checkpointing_under_zero2_logs_the_losses_of_a_run_without_it_and_resumes_exactly(
    dataset: Path, forty_step_reference: Path, tmp_path: Path
) -> None:
    """Dropout on, both blocks recomputed for 20 steps, then resumed with every other block (the first)
    recomputed: all 40 losses equal the run that kept its activations, bit for bit."""
    run_dir = tmp_path / "run"
    common = [*FORTY_STEPS, "checkpoint.every_steps=100"]
    for job in (
        [*common, "trainer.activation_checkpointing=full", "trainer.max_steps=20"],
        [*common, "trainer.activation_checkpointing=2"],
    ):
        train_in_process(dataset, run_dir, 2, *job)
    assert losses(run_dir) == losses(forty_step_reference)
    assert sorted(losses(run_dir)) == list(range(1, 41))
    assert [e["recomputed_blocks"] for e in start_events(run_dir)] == [2, 1]
    assert start_events(forty_step_reference)[0]["recomputed_blocks"] == 0


@pytest.mark.slow
def test_compiled_blocks_train_as_eager_ones_and_checkpoints_resume_across_the_two(
    dataset: Path, two_rank_reference: Path, tmp_path: Path
) -> None:
    """ZeRO-1 compiled for 3 steps, then eager; an eager ZeRO-2 run's step-3 checkpoint resumed compiled: each
    step's loss within 1e-5 relative of the eager run's (the compiled kernels sum in another order)."""
    reference = losses(two_rank_reference)
    compiled_first = tmp_path / "compiled_first"
    for job in (["trainer.compile=true", "trainer.max_steps=3"], ["trainer.max_steps=6"]):
        train_in_process(dataset, compiled_first, 2, "zero.stage=1", *job)
    eager_first = tmp_path / "eager_first"  # the eager reference's step-3 checkpoint, resumed compiled
    shutil.copytree(two_rank_reference, eager_first)
    shutil.rmtree(eager_first / "checkpoints" / "step_00000006")
    (eager_first / "checkpoints" / "latest").write_text("step_00000003")
    train_in_process(dataset, eager_first, 2, "trainer.max_steps=6", "trainer.compile=true")
    for run_dir in (compiled_first, eager_first):
        assert losses(run_dir) == pytest.approx(reference, rel=1e-5)
    first, second = start_events(compiled_first)
    assert first["compile_seconds"] > 0 and second["compile_seconds"] is None
    # The reference's own start (eager), then the resume's (compiled).
    assert [e["compile_seconds"] is None for e in start_events(eager_first)] == [True, False]


def test_bf16_on_a_cpu_without_native_bf16_warns_that_it_will_be_slow(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmscale.train import peak

    cpu = torch.device("cpu")
    monkeypatch.setattr(peak, "cpu_flags", lambda: {"avx2", "fma", "avx512f"})
    warning = peak.slow_precision(cpu, "bf16")
    assert warning is not None and "without native bf16" in warning and "no native bf16" in warning
    assert peak.slow_precision(cpu, "fp32") is None
    for native in ("amx_bf16", "avx512_bf16"):
        monkeypatch.setattr(peak, "cpu_flags", lambda native=native: {"avx2", native})
        assert peak.slow_precision(cpu, "bf16") is None and native in peak.cpu_description()
    assert peak.slow_precision(torch.device("meta"), "bf16") is None  # an accelerator is not a CPU


def test_bf16_runs_accumulate_gradients_in_fp32() -> None:
    from lmscale.config import from_dict
    from lmscale.train.ds_config import deepspeed_config
    from lmscale.train.plan import RunPlan

    for precision, accumulation in (("bf16", {"grad_accum_dtype": "fp32"}), ("fp32", None)):
        cfg = from_dict({"data": {"path": "d"}, "trainer": {"precision": precision, "grad_accum_steps": 4}})
        ds = deepspeed_config(RunPlan(cfg, 2, []), "cuda")
        assert ds.get("data_types") == accumulation and ds["bf16"]["enabled"] == (precision == "bf16")


@pytest.mark.slow
def test_a_bf16_zero1_run_on_cpu_ranks_accumulates_in_fp32_resumes_exactly_and_exports(
    dataset: Path, tmp_path: Path
) -> None:
    """bf16 weights, fp32 gradient accumulation over 2 micro-batches (DeepSpeed's BF16_Optimizer, whose files its
    own zero_to_fp32 cannot read): a resumed run repeats the uninterrupted one bit for bit, and the export of its
    fp32 master weights loads in transformers with the same logits as lmscale's model."""
    from lmscale.train.engine import written_by_bf16_optimizer

    common = ["zero.stage=1", "trainer.precision=bf16", "model.dropout=0.1"]
    full, part, out = tmp_path / "full", tmp_path / "part", tmp_path / "exported"
    train_in_process(dataset, full, 2, *common, "trainer.max_steps=6")
    shutil.copytree(full, part)  # resume from its step-3 checkpoint
    shutil.rmtree(part / "checkpoints" / "step_00000006")
    (part / "checkpoints" / "latest").write_text("step_00000003")
    train_in_process(dataset, part, 2, *common, "trainer.max_steps=6")
    assert losses(part) == losses(full) and sorted(losses(full)) == list(range(1, 7))
    assert losses(full)[6] < losses(full)[1]
    assert written_by_bf16_optimizer(full / "checkpoints" / "step_00000006")
    result = run_here("export", str(full), "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "logits check: max |diff|" in result.stdout
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float32


@pytest.mark.slow
def test_recomputation_lowers_the_measured_peak_by_what_the_estimate_says(dataset: Path, tmp_path: Path) -> None:
    """A model whose micro-batch's activations (8 blocks x 4096 tokens, about 0.5 GB) outweigh its states:
    recomputing every block lowers rank 0's measured peak (memory_gb) by most of them, and the estimate in the
    start event is within 20% of the peak with and without."""
    shape = ["model.d_model=256", "model.n_layers=8", "model.n_heads=4", "trainer.micro_batch_size=64",
             "trainer.grad_accum_steps=1", "trainer.max_steps=2", "data.num_workers=0", "trainer.eval_every_steps=0",
             "logging.wandb.mode=disabled", "logging.peak_flops=1e11"]  # fmt: skip
    peak, estimate = {}, {}
    for setting in ("none", "full"):
        run_dir = tmp_path / setting
        args = ["train", "configs/gpt-tiny.yaml", "--nproc", "2"]
        for item in [
            *shape,
            f"trainer.activation_checkpointing={setting}",
            f"data.path={dataset}",
            f"run.dir={run_dir}",
        ]:
            args += ["--set", item]
        result = run_cli(*args, env={"MALLOC_MMAP_THRESHOLD_": "131072"})
        assert result.returncode == 0, result.stderr[-3000:]
        peak[setting] = max(r["memory_gb"] for r in metrics_records(run_dir) if "memory_gb" in r)
        estimate[setting] = start_events(run_dir)[0]["memory_estimate_gb"]
        assert 0.8 * peak[setting] < estimate[setting]["total"] < 1.2 * peak[setting], (setting, peak, estimate)
    saved = estimate["none"]["activations"] - estimate["full"]["activations"]
    assert saved > 0.4 and estimate["full"]["activations_without_recompute"] == estimate["none"]["activations"]
    assert peak["none"] - peak["full"] > 0.7 * saved, (peak, saved)
