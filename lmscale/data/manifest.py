"""``manifest.json``: the contract between ``lmscale prepare`` and everything that reads a dataset.

It is written last, by atomic rename, so its presence means the dataset is complete.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from lmscale.data import object_store
from lmscale.data.object_store import is_s3
from lmscale.errors import LmscaleError, UsageError, one_line
from lmscale.files import write_text
from lmscale.tasks import TASKS

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")


@dataclass(frozen=True)
class ShardRecord:
    file: str
    """Path relative to the dataset directory."""
    samples: int
    tokens: int
    sha256: str
    bytes: int


@dataclass
class SplitRecord:
    shards: list[ShardRecord] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)


@dataclass
class Manifest:
    seq_len: int
    """Context length a sample trains: a causal sample stores seq_len + 1 tokens (inputs and shifted targets),
    a masked-LM sample seq_len ([CLS] ... [SEP], padded)."""
    dtype: str
    vocab_size: int
    eot_id: int
    tokenizer_file: str
    tokenizer_sha256: str
    tokenizer_kind: str
    splits: dict[str, SplitRecord]
    stats: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    format: str = "causal"
    """A ``lmscale.tasks`` entry: ``causal`` (GPT: a stream cut into seq_len + 1 tokens), ``mlm`` (BERT:
    RoBERTa-style packed samples), ``span_corruption`` (T5), or a fine-tuning task's examples:
    ``classification`` (``lmscale.data.labelled``), ``seq2seq`` (``lmscale.data.seq2seq``)."""
    special_tokens: dict[str, int] = field(default_factory=dict)
    """The tokenizer's special tokens and their ids, e.g. ``{"[PAD]": 0, ..., "[MASK]": 4}``."""
    labels: list[str] = field(default_factory=list)
    """Classification: the class names, in label-id order."""
    target_len: int | None = None
    """Sequence to sequence: the longest target a sample holds (``seq_len`` is its longest source)."""

    @property
    def sample_len(self) -> int:
        return TASKS[self.format].sample_len(self.seq_len, self.target_len)

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def to_json(self) -> str:
        data = asdict(self)
        for name, split in self.splits.items():
            data["splits"][name].update(samples=split.samples, tokens=split.tokens)
        return json.dumps(data, indent=2) + "\n"

    def write(self, directory: Path) -> None:
        write_text(directory / MANIFEST, self.to_json())


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


def is_remote(dataset: str | Path) -> bool:
    return isinstance(dataset, str) and ("{file}" in dataset or "://" in dataset)


def dataset_url(dataset: str, relpath: str) -> str:
    """A file of a dataset: in a local directory, under a URL prefix, or a ``pipe:`` command with ``{file}``."""
    if "{file}" in dataset:
        return dataset.format(file=relpath)
    if "://" in dataset:
        return dataset.rstrip("/") + "/" + relpath
    return str(Path(dataset) / relpath)


# webdataset opens http(s) with curl retrying 30 times and no limit on a stalled transfer, which would hang a
# rank; this aborts a transfer that stalls (under 1 kB/s for a minute) and retries a few times instead.
HTTP_FETCH = "curl --fail --silent --show-error --location --connect-timeout 20 --speed-limit 1024 --speed-time 60 "
HTTP_FETCH += "--retry 3 --retry-delay 2 "


def open_dataset_file(url: str) -> IO[bytes]:
    """A dataset file (manifest or shard) for reading: ``s3://`` through boto3 (``object_store``), anything
    else through webdataset's ``gopen``: a path, ``file://``, ``pipe:``, or ``http(s)://`` (by ``curl`` with
    the limits above)."""
    from webdataset import gopen

    if is_s3(url):
        return object_store.open_object(url)
    if url.startswith(("http://", "https://")):
        url = "pipe:" + HTTP_FETCH + shlex.quote(url)
    return gopen(url, "rb")


def read_dataset_file(url: str) -> bytes:
    """A whole dataset file. Object-store errors raise ``ObjectStoreError`` (a transport error only once its
    retries are spent); the others raise what ``gopen`` raises."""
    if is_s3(url):
        return object_store.read_object(url)
    with open_dataset_file(url) as stream:
        return stream.read()


def _read_remote(url: str) -> str:
    try:
        return read_dataset_file(url).decode("utf-8")
    except object_store.ObjectStoreError:
        raise  # already one line naming the URL
    except Exception as err:  # gopen raises OSError or a pipe command's failure
        raise UsageError(f"{url}: cannot read the manifest ({err})") from None


def dataset_tokenizer(dataset: str, manifest: Manifest) -> bytes:
    """The dataset's tokenizer.json, local or remote, checked against the manifest: a run, its export and its
    evaluation must use the tokenizer the shards were made with."""
    url = dataset_url(dataset, manifest.tokenizer_file)
    try:
        data = read_dataset_file(url)
    except object_store.ObjectStoreError:
        raise
    except Exception as err:
        raise LmscaleError(f"{url}: cannot read the tokenizer ({one_line(err)})") from None
    if hashlib.sha256(data).hexdigest() != manifest.tokenizer_sha256:
        raise LmscaleError(f"{url}: sha256 does not match the manifest's tokenizer_sha256")
    return data


def read_manifest(directory: str | Path) -> Manifest:
    if is_remote(directory):
        path: str | Path = dataset_url(str(directory), MANIFEST)
        text = _read_remote(str(path))
    else:
        directory = Path(directory)
        path = directory / MANIFEST
        if not directory.is_dir():
            raise UsageError(f"{directory}: dataset directory does not exist (run `lmscale prepare` first)")
        if not path.is_file():
            raise UsageError(f"{path}: no manifest (the dataset is incomplete or was not written by `lmscale prepare`)")
        text = path.read_text()
    try:
        data = json.loads(text)
        splits = {
            name: SplitRecord([ShardRecord(**s) for s in split["shards"]]) for name, split in data.pop("splits").items()
        }
        if data.get("format_version") != FORMAT_VERSION:
            raise LmscaleError(f"{path}: format_version {data.get('format_version')}, expected {FORMAT_VERSION}")
        if data.get("format", "causal") not in TASKS:
            raise LmscaleError(f"{path}: format {data['format']!r} is none of {', '.join(TASKS)}")
        return Manifest(splits=splits, **data)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise LmscaleError(f"{path}: malformed manifest ({err.__class__.__name__}: {err})") from None
