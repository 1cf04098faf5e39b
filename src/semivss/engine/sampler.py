"""Infinite, resumable, rank-sliced batch sampler yielding ``(index, sample_seed)`` pairs."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


def sample_seed(seed: int, position: int) -> int:
    """Deterministic 32-bit seed of the sample at global stream position ``position``."""
    return int(np.random.SeedSequence([seed, position]).generate_state(1, dtype=np.uint32)[0])


class InfiniteBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batch sampler for ``DataLoader(batch_sampler=...)`` over an endless stream of samples.

    The stream is the concatenation of epochs; epoch ``e`` is ``permutation(seed, e)`` of
    ``range(n)``, identical on all ranks. Iteration ``i`` of rank ``r`` takes stream positions
    ``[(i*W + r)*B, (i*W + r + 1)*B)``, so ranks see disjoint slices and the whole state of the
    sampler is the iteration number ``start_iter``. Every position ``p`` carries its own seed
    (``SeedSequence([seed, p])``) from which the dataset draws all its randomness.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_iter: int = 0,
    ) -> None:
        if n <= 0:
            raise ValueError(f"InfiniteBatchSampler needs a non-empty dataset, got n={n}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if seed < 0 or start_iter < 0:
            raise ValueError(f"seed and start_iter must be >= 0, got {seed}, {start_iter}")
        self.n = n
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_iter = start_iter
        self._perm_cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        """Order of the dataset indices in ``epoch`` (the same on every rank)."""
        perm = self._perm_cache.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            if len(self._perm_cache) >= 2:
                self._perm_cache.pop(min(self._perm_cache))
            self._perm_cache[epoch] = perm
        return perm

    def item(self, position: int) -> tuple[int, int]:
        """``(dataset index, sample seed)`` at global stream position ``position``."""
        epoch, offset = divmod(position, self.n)
        return int(self.permutation(epoch)[offset]), sample_seed(self.seed, position)

    def batch(self, iteration: int) -> list[tuple[int, int]]:
        """The batch this rank gets at ``iteration``."""
        start = (iteration * self.world_size + self.rank) * self.batch_size
        return [self.item(p) for p in range(start, start + self.batch_size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        iteration = self.start_iter
        while True:
            yield self.batch(iteration)
            iteration += 1
