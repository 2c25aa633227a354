"""``lmscale data inspect DIR``: the manifest's numbers, every shard's checksum, and samples decoded to text."""

from __future__ import annotations

from pathlib import Path

from lmscale.data.manifest import read_manifest
from lmscale.data.shard import summary
from lmscale.data.stream import CorruptShard, read_shard, split_shards
from lmscale.data.tokenizer import file_sha256, load_tokenizer
from lmscale.progress import Progress


def inspect_dataset(directory: Path, samples: int, verify: bool) -> int:
    manifest = read_manifest(directory)
    print(summary(manifest, directory))
    bad = []
    if verify:
        if file_sha256(directory / manifest.tokenizer_file) != manifest.tokenizer_sha256:
            bad.append(f"{manifest.tokenizer_file}: sha256 does not match the manifest")
        shards = [s for name in manifest.splits for s in manifest.splits[name].shards]
        with Progress("verify", total=len(shards), unit="shards") as progress:
            for shard in shards:
                path = directory / shard.file
                if not path.is_file():
                    bad.append(f"{shard.file}: missing")
                elif file_sha256(path) != shard.sha256:
                    bad.append(f"{shard.file}: sha256 does not match the manifest")
                progress.advance()
        for line in bad:
            print(f"  CORRUPT {line}")
        print(f"  checksums: {len(shards) - len(bad)}/{len(shards)} shards ok")
    if samples:
        tok = load_tokenizer(directory / manifest.tokenizer_file)
        first = split_shards(str(directory), manifest, "train")[0]
        try:
            tokens, keys = read_shard(first, manifest.sample_len, manifest.np_dtype)
        except CorruptShard as err:
            print(f"  cannot decode {first.name}: {err}")
            return 1
        for key, row in list(zip(keys, tokens, strict=True))[:samples]:
            print(f"\n--- {key} ({len(row)} tokens)\n{tok.decode(row.tolist(), skip_special_tokens=False)}")
    return 1 if bad else 0
