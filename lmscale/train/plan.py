"""Resolve a validated config against its datasets and world size: the numbers every rank agrees on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from lmscale import run_layout
from lmscale.config import Config, ConfigError, grad_accum_steps
from lmscale.data.manifest import Manifest, dataset_tokenizer, dataset_url, read_manifest
from lmscale.errors import LmscaleError
from lmscale.models import ModelConfig
from lmscale.tasks import task_of


@dataclass(frozen=True)
class RunPlan:
    cfg: Config
    """The config with model.vocab_size, model.seq_len and trainer.grad_accum_steps filled in."""
    world_size: int
    manifests: list[Manifest]

    @property
    def micro_batch_size(self) -> int:
        return self.cfg.trainer.micro_batch_size

    @property
    def grad_accum_steps(self) -> int:
        assert self.cfg.trainer.grad_accum_steps is not None
        return self.cfg.trainer.grad_accum_steps

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    @property
    def seq_len(self) -> int:
        """Tokens each sample trains on (the dataset's seq_len)."""
        return self.manifests[0].seq_len

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    @property
    def model_config(self) -> ModelConfig:
        """The model section, vocab_size and seq_len filled in."""
        return self.cfg.model


def read_manifests(cfg: Config) -> list[Manifest]:
    """The manifest of every data source; a missing or unreadable one is a ConfigError naming its field."""
    manifests = []
    for i, source in enumerate(cfg.data.resolved_sources()):
        field = "data.path" if cfg.data.path is not None else f"data.sources[{i}].path"
        try:
            manifests.append(read_manifest(source.path))
        except LmscaleError as err:
            raise ConfigError(f"{field}: {err}") from None
    return manifests


def plan_run(cfg: Config, world_size: int) -> RunPlan:
    sources = cfg.data.resolved_sources()
    manifests = read_manifests(cfg)
    first = manifests[0]
    for source, manifest in zip(sources[1:], manifests[1:], strict=True):
        if manifest.tokenizer_sha256 != first.tokenizer_sha256:
            raise ConfigError(f"data.sources: {source.path} uses another tokenizer than {sources[0].path}")
        if manifest.seq_len != first.seq_len:
            raise ConfigError(
                f"data.sources: {source.path} has seq_len {manifest.seq_len}, {sources[0].path} {first.seq_len}"
            )
    m = cfg.model
    task = task_of(m)
    for i, (source, manifest) in enumerate(zip(sources, manifests, strict=True)):
        field = "data.path" if cfg.data.path is not None else f"data.sources[{i}].path"
        if manifest.format != task.name:
            raise ConfigError(
                f"{field}: {source.path} holds {manifest.format} shards, but model.family {m.family} trains on "
                f"{task.name} shards ({task.how_to_prepare})"
            )
        if task.labelled and manifest.labels != m.labels:
            raise ConfigError(f"model.labels: {m.labels} here, {manifest.labels} in {source.path}")
    vocab_size = m.vocab_size or first.vocab_size
    if vocab_size < first.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {vocab_size} is smaller than the tokenizer's {first.vocab_size} ({sources[0].path})"
        )
    seq_len = m.seq_len or first.seq_len
    if first.seq_len > seq_len and m.position_limit is None:
        seq_len = first.seq_len  # relative positions take inputs of any length: the model's is the data's
    if first.seq_len > seq_len:
        raise ConfigError(
            f"model.seq_len: the data's seq_len {first.seq_len} ({sources[0].path}) is larger than "
            f"the model's {seq_len} positions"
        )
    trainer = dataclasses.replace(cfg.trainer, grad_accum_steps=grad_accum_steps(cfg, world_size))
    fields = task.model_fields(first)  # what the task decides of the model
    model = dataclasses.replace(m, **{"vocab_size": vocab_size, "seq_len": seq_len, **fields})
    if model.init_from:
        check_init_from(model)
        check_init_from_tokenizer(model, sources[0].path, first)
    resolved = dataclasses.replace(cfg, model=model, trainer=trainer)
    return RunPlan(resolved, world_size, manifests)


def check_init_from(m: ModelConfig) -> None:
    """model.init_from must hold the architecture the model section describes (its task head aside)."""
    from lmscale.train.init_from import pretrained

    assert m.init_from is not None
    theirs = pretrained(m.init_from)
    where = theirs.path / ("config.json" if theirs.tag is None else run_layout.CONFIG)
    if theirs.model.family != m.family:
        raise ConfigError(f"model.family: {m.family} here, {theirs.model.family} in {where}")
    ours_arch, theirs_arch = m.architecture(), theirs.model.architecture()
    for name, value in ours_arch.items():
        if value != theirs_arch[name]:
            raise ConfigError(f"model.{name}: {value} here, {theirs_arch[name]} in {where}")


ORDER_FIELDS = (("run", "seed"), ("data", "shuffle"), ("data", "lanes"), ("trainer", "micro_batch_size"))
"""The settings the global sample order depends on, besides the data itself (``lmscale.data.stream``)."""


def check_same_sample_order(cfg: Config, saved_config: dict, tag: str) -> None:
    """A resume must keep the sample order, or it would repeat or skip samples without a word."""
    for section, key in ORDER_FIELDS:
        ours, theirs = getattr(getattr(cfg, section), key), saved_config.get(section, {}).get(key)
        if ours != theirs:
            raise ConfigError(
                f"{section}.{key}: {ours!r} here, {theirs!r} in checkpoint {tag}; the sample order depends on it, "
                "so the resumed run would repeat or skip samples (keep it, or start another run.name)"
            )


def lanes_warning(cfg: Config, world_size: int) -> str | None:
    readers = world_size * cfg.data.num_workers if cfg.data.num_workers else world_size
    if cfg.data.lanes % readers == 0:
        return None
    return (
        f"data.lanes={cfg.data.lanes} is not a multiple of world_size x data.num_workers = {readers}: ranks share "
        "lanes, so each reads more shards than its share"
    )


def check_init_from_tokenizer(m: ModelConfig, dataset: str, manifest: Manifest) -> None:
    """Token ids mean nothing across vocabularies: the model must have been trained with the data's tokenizer."""
    from tokenizers import Tokenizer

    from lmscale.data.tokenizer import load_tokenizer

    theirs_path = Path(str(m.init_from)) / run_layout.TOKENIZER  # an exported directory's and a run's alike
    if not theirs_path.is_file():
        return  # weights without a tokenizer: nothing to compare against
    ours = Tokenizer.from_str(dataset_tokenizer(dataset, manifest).decode("utf-8"))
    if load_tokenizer(theirs_path).get_vocab() != ours.get_vocab():
        raise ConfigError(
            f"model.init_from: {theirs_path} has another vocabulary than the dataset's "
            f"{dataset_url(dataset, manifest.tokenizer_file)}; prepare the data with --tokenizer {theirs_path}"
        )
