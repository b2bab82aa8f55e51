"""A left-padded KV cache for a continuous batch: rows join, leave and (later) roll back.

transformers' `DynamicCache` keeps one [batch, heads, tokens, head_dim] tensor per layer for a batch
that starts and ends together. Continuous batching needs rows of different lengths to share it, so
rows are left-padded to a common width with an attention mask marking the real tokens; a row that
joins is padded to the batch width (or the batch to its width) and a row that leaves is dropped,
after which columns that are padding in every row are trimmed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class BatchCache:
    """The KV cache and attention mask of the rows currently being decoded."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        for layer in cache.layers:
            if type(layer) is not DynamicLayer:
                raise ValueError(
                    f"continuous batching needs plain dynamic cache layers, got {type(layer).__name__}"
                )
        self.cache = cache
        self.mask = mask

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def lengths(self) -> torch.Tensor:
        """Real (non-padding) tokens per row: the position of the next token of each row."""
        return self.mask.sum(dim=1)

    def extend(self, other: BatchCache) -> None:
        """Append `other`'s rows below ours, padding whichever side is narrower."""
        width = max(self.width, other.width)
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width, 2), _left_pad(theirs.keys, width, 2)])
            mine.values = torch.cat([_left_pad(mine.values, width, 2), _left_pad(theirs.values, width, 2)])
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(other.mask, width, 1)])

    def append_step(self) -> None:
        """Mark the token the next forward pass adds to every row as real."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.rows, 1))], dim=1)

    def drop_last(self, row: int, count: int) -> None:
        """Forget a row's newest `count` tokens (a roll-back) by shifting the row right: left padding
        grows, so the other rows and the shared width are untouched."""
        if count <= 0:
            return
        self.mask[row] = torch.cat([self.mask.new_zeros(count), self.mask[row, :-count]])
        for layer in self.cache.layers:
            for tensor in (layer.keys, layer.values):
                tensor[row] = torch.cat(
                    [tensor.new_zeros((tensor.shape[1], count, tensor.shape[3])), tensor[row, :, :-count]],
                    dim=1,
                )

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in that order) and drop columns that became padding everywhere."""
        index = torch.tensor(list(rows), dtype=torch.long)
        mask = self.mask.index_select(0, index)
        real_columns = mask.any(dim=0).nonzero()
        start = int(real_columns[0]) if len(real_columns) else mask.shape[1]
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
