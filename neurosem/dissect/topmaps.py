"""Each unit's top images for the report, chosen during the tally pass, with their raw maps kept.

An image ranks by the size of the unit's mask on it (the pixels the tally counts: upsampled
activation above the unit's threshold), then by the unit's peak activation on it, then by its
position in the dataset (the earlier first). Ranking by the peak alone shows arbitrary images of a
saturated unit (many images tie at the maximum) whose masks may be tiny; the mask size is what the
IoU counts, so the images shown are those where the unit's label is earned.

The raw maps of the current top images are kept (``C × k`` small maps), so the report computes
their masks without reading the activations again; the memory grows with the number of images
shown, not with the number of images.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neurosem.errors import NeurosemError


@dataclass
class TopResult:
    """``images [C, k]`` dataset positions (-1: none), ``sizes [C, k]`` mask pixels,
    ``maxes [C, k]`` peak activations, ``maps [C, k, h, w]`` the raw maps."""

    images: np.ndarray
    sizes: np.ndarray
    maxes: np.ndarray
    maps: np.ndarray


class TopMaps:
    """Streaming top-``k`` images per unit by (mask size, peak activation, earlier position).

    Args:
        n_units: ``C``; k: images per unit (``k >= 1``); map_shape: ``(h, w)``; dtype: of the maps.

    Example:
        >>> import numpy as np
        >>> top = TopMaps(1, 1, (1, 1), np.float32)
        >>> maps = np.array([[[[5.0]]], [[[2.0]]]], dtype=np.float32)       # [B=2, C=1, 1, 1]
        >>> top.add(0, sizes=np.array([[1], [3]]), maxes=np.array([[5.0], [2.0]]), maps=maps)
        >>> top.result().images.tolist()                     # the larger mask wins
        [[1]]
    """

    def __init__(self, n_units: int, k: int, map_shape: tuple[int, int], dtype: type | np.dtype) -> None:
        if int(k) < 1:
            raise NeurosemError(f"top images per unit must be >= 1, got {k}")
        c, k = int(n_units), int(k)
        self.k = k
        self.images = np.full((c, k), -1, dtype=np.int64)
        self.sizes = np.full((c, k), -1, dtype=np.int64)
        self.maxes = np.full((c, k), -np.inf, dtype=np.float64)
        self.maps = np.zeros((c, k, *map_shape), dtype=dtype)

    def add(self, start: int, sizes: np.ndarray, maxes: np.ndarray, maps: np.ndarray) -> None:
        """Add a batch of images ``start .. start + B``.

        Args:
            start: dataset position of the first image.
            sizes: ``[B, C]`` mask pixels of each map; maxes: ``[B, C]`` peak of each map.
            maps: ``[B, C, h, w]`` the raw maps (only the chosen ones are copied).
        """
        b, c = sizes.shape
        if b == 0:
            return
        idx = np.arange(start, start + b, dtype=np.int64)
        all_sz = np.concatenate([self.sizes, np.asarray(sizes, dtype=np.int64).T], 1)      # [C, k + B]
        mx = np.asarray(maxes, dtype=np.float64).T
        all_mx = np.concatenate([self.maxes, np.where(np.isnan(mx), -np.inf, mx)], 1)
        all_ix = np.concatenate([self.images, np.broadcast_to(idx, (c, b))], 1)
        empty = all_ix < 0
        # per unit (row): larger mask, larger peak, earlier image; empty slots last
        order = np.lexsort((np.where(empty, np.iinfo(np.int64).max, all_ix), -all_mx, -all_sz,
                            empty), axis=-1)[:, :self.k]
        rows = np.arange(c)[:, None]
        new_maps = np.empty_like(self.maps)
        old = order < self.k
        uo, jo = np.nonzero(old)
        new_maps[uo, jo] = self.maps[uo, order[uo, jo]]
        un, jn = np.nonzero(~old)
        new_maps[un, jn] = maps[order[un, jn] - self.k, un]
        self.sizes = all_sz[rows, order]
        self.maxes = all_mx[rows, order]
        self.images = all_ix[rows, order]
        self.maps = new_maps

    def result(self) -> TopResult:
        """The top images so far (``sizes`` -1 and ``images`` -1 where a unit has fewer)."""
        return TopResult(images=self.images.copy(), sizes=self.sizes.copy(), maxes=self.maxes.copy(),
                         maps=self.maps.copy())
