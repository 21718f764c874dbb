"""The order training reads its images in: endless, reshuffled every epoch, grouped by aspect ratio, and a
function of (seed, step) alone, so a run resumed at step s reads exactly the batches it would have read.

Grouping: a batch is padded to its largest image, so a portrait photo batched with a landscape one pads
most of both. As torchvision's GroupedBatchSampler (``--aspect-ratio-group-factor``) does, images go into
bins of aspect ratio and a batch is drawn from one bin; an epoch's last, partial batch of a bin is
completed with that bin's first images of the epoch, so every batch is full and every epoch has the same
number of batches (which is what makes a step's batch computable without replaying the ones before).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


def aspect_ratio_groups(sizes: Sequence[tuple[int, int]], factor: int) -> np.ndarray:
    """A bin per image from its (height, width): torchvision's bins, 2 ** linspace(-1, 1, 2 * factor + 1)
    of width / height; ``factor`` 0 puts every image in one group."""
    if factor <= 0:
        return np.zeros(len(sizes), np.int64)
    edges = 2 ** np.linspace(-1, 1, 2 * factor + 1)
    ratios = np.array([w / h for h, w in sizes], np.float64)
    return np.digitize(ratios, edges).astype(np.int64)


class ResumableSampler(Sampler[list[int]]):
    """Endless batches of dataset indices from ``start_step`` on; ``groups`` (one id per image) keeps
    each batch within one aspect-ratio bin.

    Index ``epoch * n + j`` stands for item j in that epoch, so the dataset (which wraps indices) draws a
    fresh flip/scale per epoch.
    """

    def __init__(self, groups: np.ndarray, batch_size: int, seed: int, start_step: int = 0) -> None:
        self.groups = np.asarray(groups, np.int64)
        self.n, self.batch_size, self.seed, self.start_step = len(self.groups), batch_size, seed, start_step
        counts = np.bincount(self.groups) if self.n else np.zeros(0, np.int64)
        self.batches_per_epoch = int(sum(-(-int(c) // batch_size) for c in counts if c))

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches of one epoch, as dataset indices: full batches in the order they fill, then each
        bin's partial batch completed from the start of that bin's order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        batches: list[list[int]] = []
        pending: dict[int, list[int]] = {}
        for j in order.tolist():
            batch = pending.setdefault(int(self.groups[j]), [])
            batch.append(j)
            if len(batch) == self.batch_size:
                batches.append(batch)
                pending[int(self.groups[j])] = []
        for group, batch in sorted(pending.items()):
            if batch:
                members = order[self.groups[order] == group].tolist()
                batch += [members[k % len(members)] for k in range(self.batch_size - len(batch))]
                batches.append(batch)
        return [[epoch * self.n + j for j in batch] for batch in batches]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, skip = divmod(self.start_step, self.batches_per_epoch)
        while True:
            yield from self.epoch_batches(epoch)[skip:]
            epoch, skip = epoch + 1, 0
