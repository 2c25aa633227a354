"""``lmscale data inspect DATASET``: the manifest's numbers, every shard's checksum, and samples decoded to
text; DATASET is a directory or a URL (``s3://``, ``https://``)."""

from __future__ import annotations

from tokenizers import Tokenizer

from lmscale.data.manifest import dataset_tokenizer, read_manifest
from lmscale.data.shard import summary
from lmscale.data.stream import CorruptShard, read_shard, shard_bytes, shard_ref, split_shards
from lmscale.errors import LmscaleError
from lmscale.progress import Progress


def inspect_dataset(dataset: str, samples: int, verify: bool) -> int:
    manifest = read_manifest(dataset)
    print(summary(manifest, dataset))
    bad: list[str] = []
    tokenizer_json = None
    try:
        tokenizer_json = dataset_tokenizer(dataset, manifest)
    except LmscaleError as err:
        bad.append(f"{manifest.tokenizer_file}: {str(err).rpartition(': ')[2]}")
    if verify:
        shards = [s for split in manifest.splits.values() for s in split.shards]
        corrupt = []
        with Progress("verify", total=len(shards), unit="shards") as progress:
            for shard in shards:
                try:
                    shard_bytes(shard_ref(dataset, shard))
                except CorruptShard as err:
                    corrupt.append(f"{shard.file}: {err}")
                progress.advance()
        print(f"  checksums: {len(shards) - len(corrupt)}/{len(shards)} shards ok")
        bad += corrupt
    for line in bad:
        print(f"  CORRUPT {line}")
    if samples and tokenizer_json is not None:
        tok = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        first = split_shards(dataset, manifest, "train")[0]
        try:
            tokens, keys = read_shard(first, manifest.sample_len, manifest.np_dtype)
        except CorruptShard as err:
            print(f"  cannot decode {first.name}: {err}")
            return 1
        for key, row in list(zip(keys, tokens, strict=True))[:samples]:
            print(f"\n--- {key} ({len(row)} tokens)\n{tok.decode(row.tolist(), skip_special_tokens=False)}")
    return 1 if bad else 0
