"""Export to Hugging Face format, checked against the real ``transformers`` classes."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmscale.config import DataConfig
from lmscale.data.manifest import read_manifest
from lmscale.data.stream import ShardStream, StreamSource, split_shards
from lmscale.errors import LmscaleError
from lmscale.export.export import check_parity, write_hf_dir
from lmscale.hf.convert import from_hf, to_hf
from lmscale.hf.directory import load_hf_model
from lmscale.inference.generate import SamplingOptions, generate
from lmscale.models.gpt import GPT, GPTConfig
from lmscale.train.checkpoint_manifest import digest

from .conftest import TINY_OVERRIDES, run_cli, run_here

FLAVORS = {
    "gpt2": dict(flavor="gpt2"),
    "llama": dict(flavor="llama", n_kv_heads=2, tie_embeddings=False),
}


def tiny_model(flavor: str) -> GPT:
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=512, seq_len=64, d_model=64, n_layers=2, n_heads=4, **FLAVORS[flavor]))
    with torch.no_grad():  # move off the init so that biases and norms are not trivially 0 and 1
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def assert_matches_transformers(model: GPT, directory: Path) -> None:
    hf = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    batch = torch.randint(0, model.cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(hf(batch).logits, model(batch)[0], atol=2e-4, rtol=1e-4)
    prompt = batch[:1, :8]
    theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 8:]
    ours = generate(model, [prompt[0].tolist()], SamplingOptions(max_new_tokens=20, temperature=0), eot_id=-1)[0]
    assert ours == theirs.tolist()


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_converter_matches_transformers_and_round_trips(flavor: str, dataset: Path, tmp_path: Path) -> None:
    model = tiny_model(flavor)
    sd = {k: v for k, v in model.state_dict().items()}
    back = from_hf(to_hf(sd, model.cfg), model.cfg)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    out = tmp_path / "hf"
    out.mkdir()
    architecture = write_hf_dir(model, dataset / "tokenizer.json", out, "fp32", "5GB")
    assert architecture == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[flavor]
    assert_matches_transformers(model, out)
    diff, tol = check_parity(model, out, "fp32")
    assert diff < 1e-4 and 1e-3 <= tol < 2e-3
    reloaded, _ = load_hf_model(out)  # what generate, eval and model.init_from use
    for k, v in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.eos_token == "<|endoftext|>" and tok("def main").input_ids


def test_sharded_bf16_export_loads(dataset: Path, tmp_path: Path) -> None:
    model = tiny_model("llama")
    out = tmp_path / "hf"
    out.mkdir()
    write_hf_dir(model, dataset / "tokenizer.json", out, "bf16", "100KB")
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    diff, tol = check_parity(model, out, "bf16")  # against lmscale's weights rounded to bf16: a tight check
    assert diff < 1e-4 and diff < tol
    reloaded, _ = load_hf_model(out)
    assert reloaded.tok_emb.weight.dtype == torch.float32


def train(run_dir: Path, dataset: Path, *overrides: str) -> None:
    args = ["train", "configs/gpt-tiny.yaml", "--nproc", "2"]
    for item in [*TINY_OVERRIDES, f"data.path={dataset}", f"run.dir={run_dir}", "trainer.eval_every_steps=0",
                 "checkpoint.every_steps=0", *overrides]:  # fmt: skip
        args += ["--set", item]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def three_steps(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step ZeRO-2 run on 2 ranks whose only checkpoint is step 3: what the export tests start from."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    train(run_dir, dataset, "trainer.max_steps=3")
    return run_dir


def validation_loss(model: GPT, dataset: Path, world: int = 2, micro_batch: int = 4, batches: int = 2) -> float:
    """The validation loss as the trainer computes it: each rank's first micro-batches, averaged."""
    manifest = read_manifest(dataset)
    losses = []
    for rank in range(world):
        stream = ShardStream([StreamSource(split_shards(str(dataset), manifest, "validation"))], manifest.sample_len,
                             manifest.dtype, micro_batch, rank, world, seed=0, shuffle=False)  # fmt: skip
        for i in range(batches):
            with torch.no_grad():
                losses.append(model(**stream.micro_batch(i)["inputs"])[1].item())
    return float(np.mean(losses))


@pytest.mark.slow
# Both flavors' key tables, each with ZeRO-3 (built inside zero.Init).
# ZeRO-1 consolidation is the GPU check's (tests/test_gpu_check.py exports its ZeRO-1 run); ZeRO-2's the
# three_steps run's below.
@pytest.mark.parametrize(("flavor", "stage"), [("gpt2", 3), ("llama", 3)])
def test_train_export_load_with_transformers(flavor: str, stage: int, dataset: Path, tmp_path: Path) -> None:
    extra = ["model.flavor=llama", "model.n_kv_heads=2", "model.tie_embeddings=false"] if flavor == "llama" else []
    run_dir, out = tmp_path / "run", tmp_path / "exported"
    train(run_dir, dataset, f"zero.stage={stage}", "trainer.max_steps=3", "trainer.eval_every_steps=3", *extra)
    result = run_here("export", str(run_dir), "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "logits check: max |diff|" in result.stdout
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (out / name).is_file(), name
    model, config = load_hf_model(out)
    assert config["architectures"] == [{"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[flavor]]
    # The consolidated weights are the trained ones: the export scores the validation batches exactly as the
    # ZeRO-partitioned engine did at the last step.
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val_loss = next(r["val_loss"] for r in logged if "val_loss" in r)
    assert validation_loss(model.eval(), dataset) == pytest.approx(val_loss, abs=1e-5)
    assert_matches_transformers(model, out)
    gen = run_here("generate", str(out), "--prompt", "Return the", "--max-new-tokens", "8", "--temperature", "0")
    assert gen.returncode == 0 and gen.stdout.startswith("Return the"), gen.stderr


@pytest.mark.slow
def test_export_then_init_from_continues_from_the_same_weights(
    dataset: Path, three_steps: Path, tmp_path: Path
) -> None:
    out, second = tmp_path / "exported", tmp_path / "second"
    assert run_here("export", str(three_steps), "--output", str(out)).returncode == 0
    # ZeRO-3 reads the weights on rank 0 and writes them into the partitioned model one parameter at a time.
    for stage in (2, 3):
        train(second / str(stage), dataset, "trainer.max_steps=1", f"model.init_from={out}", f"zero.stage={stage}")
    first_steps = [
        next(json.loads(line) for line in (second / str(stage) / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line)
        for stage in (2, 3)
    ]  # fmt: skip
    # The loss of step 1 is the exported model's loss on the first global batch (2 ranks x 2 micro-batches).
    model, _ = load_hf_model(out)
    manifest = read_manifest(dataset)
    losses = []
    for rank in range(2):
        stream = ShardStream([StreamSource(split_shards(str(dataset), manifest, "train"))], manifest.sample_len,
                             manifest.dtype, 4, rank, 2, seed=1234, lanes=DataConfig().lanes)  # fmt: skip
        for i in range(2):
            with torch.no_grad():
                losses.append(model(**stream.micro_batch(i)["inputs"])[1].item())
    for step1 in first_steps:
        assert step1["loss"] == pytest.approx(float(np.mean(losses)), abs=1e-5)
    # A mismatched architecture is refused before any rank starts.
    args = [
        "train",
        "configs/gpt-tiny.yaml",
        "--dry-run",
        "--set",
        f"data.path={dataset}",
        "--set",
        f"model.init_from={out}",
        *[a for s in TINY_OVERRIDES for a in ("--set", s)],
        "--set",
        "model.d_model=128",
    ]
    bad = run_cli(*args)
    assert bad.returncode == 2 and f"model.d_model: 128 here, 64 in {out}/config.json" in bad.stderr


@pytest.mark.slow
def test_export_bad_inputs(dataset: Path, three_steps: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    result = run_here("export", str(empty), "--output", str(tmp_path / "x"))
    assert result.returncode == 1 and "no complete checkpoint to export" in result.stderr
    shutil.copytree(three_steps, run_dir)
    # A damaged tag: a file of its manifest is gone.
    half = run_dir / "checkpoints" / "step_00000009"
    shutil.copytree(run_dir / "checkpoints" / "step_00000003", half)
    (half / "lmscale_state.json").unlink()
    result = run_here("export", str(run_dir), "--checkpoint", "step_00000009", "--output", str(tmp_path / "x"))
    assert result.returncode == 1
    assert f"checkpoint step_00000009 fails verification: {half}/lmscale_state.json: missing" in result.stderr
    # latest (step 3) is exported.
    ok = run_here("export", str(run_dir), "--output", str(tmp_path / "ok"))
    assert ok.returncode == 0 and "step_00000003" in ok.stdout
    # eval takes the run directory too (consolidating its latest checkpoint) and scores like the export.
    from_run = run_here("eval", str(run_dir), "--data", str(dataset))
    from_export = run_here("eval", str(tmp_path / "ok"), "--data", str(dataset))
    assert from_run.returncode == 0 and from_export.returncode == 0, from_run.stderr[-2000:]
    assert from_run.stdout == from_export.stdout and len(from_run.stdout.splitlines()) == 1
    again = run_here("export", str(run_dir), "--output", str(tmp_path / "ok"))
    assert again.returncode == 2 and "output exists (pass --overwrite" in again.stderr
    # A checkpoint whose recorded config describes another model shape.
    state_file = run_dir / "checkpoints" / "step_00000003" / "lmscale_state.json"
    state = json.loads(state_file.read_text())
    state["config"]["model"]["d_model"] = 128
    state_file.write_text(json.dumps(state))
    manifest_file = state_file.with_name("manifest.json")  # as if saved so: the checkpoint verifies
    manifest = json.loads(manifest_file.read_text())
    manifest["files"]["lmscale_state.json"] = dict(zip(("size", "sha256"), digest(state_file), strict=True))
    manifest_file.write_text(json.dumps(manifest))
    result = run_here("export", str(run_dir), "--output", str(tmp_path / "y"))
    assert result.returncode == 1 and "a checkpoint of another model shape" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3


@pytest.mark.slow
def test_export_fails_when_the_exported_logits_differ(three_steps: Path, tmp_path: Path, monkeypatch) -> None:
    import lmscale.export.export as export

    run_dir, out = three_steps, tmp_path / "exported"

    def missed_transpose(state: dict, cfg: GPTConfig) -> dict:
        hf = to_hf(state, cfg)
        key = "transformer.h.1.attn.c_proj.weight"  # square, so the shapes still fit: the classic silent bug
        hf[key] = hf[key].t().contiguous()
        return hf

    monkeypatch.setattr(export, "to_hf", missed_transpose)
    with pytest.raises(
        LmscaleError, match=r"GPT2LMHeadModel logits differ from lmscale's: max \|diff\| \S+ > tolerance \S+"
    ):
        export.export_checkpoint(run_dir, out)
    assert not out.exists() and not list(tmp_path.glob(".exported*"))  # nothing half-written is left


def test_eval_reports_the_models_loss_on_a_dataset_and_on_text(dataset: Path, corpus_dir: Path, tmp_path: Path) -> None:
    model = tiny_model("gpt2")
    out = tmp_path / "hf"
    out.mkdir()
    write_hf_dir(model, dataset / "tokenizer.json", out, "fp32", "5GB")
    manifest = read_manifest(dataset)
    rows = np.concatenate([s for s in (read_shard_rows(dataset, manifest))])
    with torch.no_grad():
        tokens = torch.from_numpy(rows.astype(np.int64))
        expected = model(tokens[:, :-1], tokens[:, 1:])[1].item()
    result = run_cli("eval", str(out), "--data", str(dataset), "--batch-size", "1000")  # as its own process
    assert result.returncode == 0, result.stderr
    loss = float(result.stdout.split()[1])
    assert loss == pytest.approx(expected, abs=1e-4)
    assert f"({rows.shape[0] * 64:,} tokens)" in result.stdout
    text = run_here("eval", str(out), "--data", str(corpus_dir / "stdlib-docs-0.jsonl"))
    assert text.returncode == 0 and "perplexity" in text.stdout, text.stderr


def read_shard_rows(dataset: Path, manifest) -> list[np.ndarray]:
    from lmscale.data.stream import read_shard

    return [
        read_shard(s, manifest.sample_len, manifest.np_dtype)[0]
        for s in split_shards(str(dataset), manifest, "validation")
    ]


def test_init_from_refuses_what_it_cannot_continue(dataset: Path, tmp_path: Path) -> None:
    from lmscale.config import ConfigError
    from lmscale.hf.gpt import gpt_config_from_hf
    from lmscale.train.plan import check_init_from_tokenizer

    llama = {"model_type": "llama", "vocab_size": 512, "max_position_embeddings": 64, "hidden_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}  # fmt: skip
    assert gpt_config_from_hf(llama).flavor == "llama"
    for extra, named in (({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling"),
                         ({"attention_bias": True}, "attention_bias"), ({"hidden_act": "gelu"}, "hidden_act 'gelu'")):  # fmt: skip
        with pytest.raises(LmscaleError, match=f"config.json: {named} is not supported"):
            gpt_config_from_hf({**llama, **extra})
    # A model directory whose tokenizer numbers the tokens differently from the dataset's.
    other = tmp_path / "other"
    other.mkdir()
    spec = json.loads((dataset / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="model.init_from: .* has another vocabulary than the dataset's"):
        check_init_from_tokenizer(GPTConfig(init_from=str(other)), str(dataset), read_manifest(dataset))
    shutil.copy(dataset / "tokenizer.json", other / "tokenizer.json")
    check_init_from_tokenizer(GPTConfig(init_from=str(other)), str(dataset), read_manifest(dataset))
