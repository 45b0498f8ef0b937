"""Storage: one filesystem protocol (local paths or fsspec URLs such as s3://), checksummed files,
and token-shard datasets."""

from bagualu.storage.fs import atomic_write, filesystem, is_local, is_url, join, sha256_file
from bagualu.storage.token_shards import ShardWriter, TokenDataset

__all__ = ["filesystem", "atomic_write", "sha256_file", "is_local", "is_url", "join", "ShardWriter", "TokenDataset"]
