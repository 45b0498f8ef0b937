"""Token shards (bagualu.storage) and the resumable sampler (bagualu.train.sampler)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bagualu.storage import ShardWriter, TokenDataset
from bagualu.train.sampler import TokenSampler

pytestmark = pytest.mark.unit


def write(out, docs, vocab=1000, shard_tokens=50):
    w = ShardWriter(str(out), vocab_size=vocab, eos_token_id=0, shard_tokens=shard_tokens)
    for d in docs:
        w.add(d)
    return w.close()


def docs(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(1, 1000, rng.integers(1, 30))) for _ in range(n)]


@pytest.mark.parametrize("where", ["local", "memory"])
def test_round_trip_across_shards(tmp_path, where):
    out = str(tmp_path / "ds") if where == "local" else f"memory://ds-{id(tmp_path)}"
    d = docs()
    m = write(out, d)
    flat = np.concatenate([np.array(x + [0]) for x in d])
    assert len(m["shards"]) > 3 and m["total_tokens"] == flat.size and m["documents"] == len(d)
    ds = TokenDataset(out, verify=True)
    assert len(ds) == flat.size and ds.vocab_size == 1000
    for start, n in [(0, 10), (45, 20), (flat.size - 7, 7), (0, flat.size)]:  # windows that cross shards
        assert np.array_equal(ds.window(start, n), flat[start:start + n])
    with pytest.raises(IndexError, match="outside the dataset"):
        ds.window(flat.size - 3, 5)


def test_corruption_and_incomplete_datasets_are_detected(tmp_path):
    write(tmp_path / "ds", docs())
    shard = tmp_path / "ds" / "shard-00001.bin"
    raw = bytearray(shard.read_bytes())
    raw[3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    TokenDataset(str(tmp_path / "ds"))  # not verified: opens
    with pytest.raises(ValueError, match="shard-00001.bin does not match its checksum"):
        TokenDataset(str(tmp_path / "ds"), verify=True)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="shard shard-00001.bin listed in manifest.json is missing"):
        TokenDataset(str(tmp_path / "ds"))
    (tmp_path / "ds" / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        TokenDataset(str(tmp_path / "ds"))
    w = ShardWriter(str(tmp_path / "bad"), vocab_size=10, eos_token_id=0)
    with pytest.raises(ValueError, match=r"token id out of range \[0, 10\)"):
        w.add([3, 11])


@pytest.fixture()
def dataset(tmp_path):
    write(tmp_path / "ds", docs(200), shard_tokens=300)
    return TokenDataset(str(tmp_path / "ds"))


def test_sampler_is_deterministic_and_ranks_partition_the_global_batch(dataset):
    S, G = 16, 8
    whole = TokenSampler(dataset, S, G, seed=3)
    parts = [TokenSampler(dataset, S, G, seed=3, rank=r, world=4) for r in range(4)]
    for _ in range(5):
        batch = whole.next_batch()
        assert batch.shape == (G, S + 1) and batch.dtype == torch.int64
        assert torch.equal(torch.cat([p.next_batch() for p in parts]), batch)
    again = TokenSampler(dataset, S, G, seed=3)
    assert torch.equal(again.next_batch(), TokenSampler(dataset, S, G, seed=3).next_batch())
    assert not torch.equal(TokenSampler(dataset, S, G, seed=4).next_batch(),
                           TokenSampler(dataset, S, G, seed=3).next_batch())


def test_sampler_resumes_exactly_and_across_world_sizes(dataset):
    S, G = 16, 8
    ref = TokenSampler(dataset, S, G, seed=1)
    seq = [ref.next_batch() for _ in range(ref.steps_per_epoch + 3)]  # crosses an epoch boundary
    assert ref.epoch == 1
    a = TokenSampler(dataset, S, G, seed=1, rank=0, world=2)
    for _ in range(4):
        a.next_batch()
    state = a.state_dict()
    resumed = [TokenSampler(dataset, S, G, seed=1, rank=r, world=4) for r in range(4)]
    for r in resumed:
        r.load_state_dict(state)
    for i in range(4, len(seq)):
        assert torch.equal(torch.cat([r.next_batch() for r in resumed]), seq[i])
    with pytest.raises(ValueError, match="saved with seed 1, this run uses 2"):
        TokenSampler(dataset, S, G, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch=8 is not divisible by world size 3"):
        TokenSampler(dataset, S, G, world=3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TokenSampler(dataset, 4000, G)
