"""Kept for the import paths docs/distributed.md showed; sharded extraction is in :mod:`featx.extract.sharded`."""

from featx._runtime.dist import BARRIER_TIMEOUT, TorchrunEnv
from featx.extract.sharded import JoinResult, Shard, join_shards, shard_path

__all__ = ["BARRIER_TIMEOUT", "JoinResult", "Shard", "TorchrunEnv", "join_shards", "shard_path"]
