"""A deterministic, resumable sampler of training windows over a token dataset.

Legend: B rows per rank, G = global batch (rows over all ranks), S sequence length.

Samples are non-overlapping windows of S + 1 tokens (inputs and shifted targets share S), shuffled per
epoch by a permutation that depends only on (seed, epoch). Step i's global batch is rows
[i·G, (i+1)·G) of that permutation; rank r takes its B = G / world consecutive rows. The state is just
(epoch, step) — independent of the world size, so a run saved with N ranks resumes with M.
"""

from __future__ import annotations

import numpy as np
import torch

from bagualu.storage.token_shards import TokenDataset


class TokenSampler:
    def __init__(self, dataset: TokenDataset, seq_len: int, global_batch: int, *, seed: int = 0, rank: int = 0,
                 world: int = 1, holdout: int = 0, split: str = "train"):
        """``holdout`` windows at the end of the dataset are kept out of ``split="train"`` and are the
        whole of ``split="eval"`` (in order, no shuffling)."""
        if global_batch % world:
            raise ValueError(f"global_batch={global_batch} is not divisible by world size {world}; "
                             f"choose a multiple of {world}")
        total = (len(dataset) - 1) // seq_len
        self.first = total - holdout if split == "eval" else 0
        self.windows = holdout if split == "eval" else total - holdout
        self.shuffle = split == "train"
        if self.windows < global_batch:
            raise ValueError(f"the dataset holds {len(dataset)} tokens: {self.windows} windows of {seq_len + 1}, "
                             f"fewer than one global batch of {global_batch}; use more data or smaller batches")
        self.ds, self.S, self.G = dataset, seq_len, global_batch
        self.seed, self.rank, self.B = seed, rank, global_batch // world
        self.epoch, self.step = 0, 0
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.windows // self.G

    def _permutation(self) -> np.ndarray:
        if self._perm is None or self._perm[0] != self.epoch:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.windows) if self.shuffle \
                else np.arange(self.windows)
            self._perm = (self.epoch, order + self.first)
        return self._perm[1]

    def next_batch(self) -> torch.Tensor:
        """This rank's rows of the next global batch: int64 ``[B, S + 1]``."""
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        first = self.step * self.G + self.rank * self.B
        rows = self._permutation()[first:first + self.B]
        batch = np.stack([self.ds.window(int(w) * self.S, self.S + 1) for w in rows])
        self.step += 1
        return torch.from_numpy(batch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
