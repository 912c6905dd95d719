"""Which positions of a sequence survive a prune, and how to carry tensors and masks over to the survivors."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Survivors:
    """The positions of a `source_length`-long sequence that survive, per sample, in original order.

    Samples may drop different numbers of tokens (images of different sizes), but a batch needs one length:
    shorter samples keep some of their dropped positions as *fillers*, marked invalid and masked out of
    attention, so every row has the same length.
    """

    #: [B, L'] source positions, ascending in each row.
    index: torch.Tensor
    #: [B, L'] False for fillers.
    valid: torch.Tensor
    source_length: int

    @classmethod
    def from_keep_mask(cls, keep: torch.Tensor) -> Survivors:
        """From a [B, L] bool mask of kept positions."""
        counts = keep.sum(dim=1)
        length = int(counts.max())
        rows, valid = [], []
        for row, count in zip(keep, counts.tolist()):
            fillers = (~row).nonzero().flatten()[: length - count]
            index = torch.cat([row.nonzero().flatten(), fillers]).sort().values
            rows.append(index)
            valid.append(row[index])
        return cls(index=torch.stack(rows), valid=torch.stack(valid), source_length=keep.shape[1])

    @property
    def has_fillers(self) -> bool:
        return not bool(self.valid.all())

    def then(self, inner: Survivors) -> Survivors:
        """These survivors followed by `inner`, a prune of them, as one map from the original sequence."""
        return Survivors(
            index=self.index.gather(1, inner.index),
            valid=self.valid.gather(1, inner.index) & inner.valid,
            source_length=self.source_length,
        )

    def gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Select the surviving positions of `tensor` along `dim`; dim 0 is the batch (size B or 1)."""
        return gather_positions(tensor, self.index, dim)

    def dropped_before(self) -> torch.Tensor:
        """[B, L'] how many positions before each survivor were dropped (fillers count as dropped)."""
        rank = self.valid.long().cumsum(dim=1) - 1
        return self.index - rank

    def total_dropped(self) -> torch.Tensor:
        """[B] positions dropped per sample (fillers count as dropped)."""
        return self.source_length - self.valid.sum(dim=1)

    def columns_with_new(self, total_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, valid) over a key axis of `total_length` columns: the survivors of the source sequence,
        then every position appended after it (generated tokens), which always survive."""
        batch = self.index.shape[0]
        new = torch.arange(self.source_length, total_length, device=self.index.device).expand(batch, -1)
        index = torch.cat([self.index, new], dim=1)
        valid = torch.cat([self.valid, torch.ones_like(new, dtype=torch.bool)], dim=1)
        return index, valid


def gather_positions(tensor: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """`tensor` restricted to `index` [B, L'] along `dim`; a batch dimension of 1 is broadcast to B."""
    dim = dim % tensor.dim()
    batch = index.shape[0]
    tensor = tensor.expand(batch, *tensor.shape[1:]) if tensor.shape[0] == 1 else tensor
    view = [1] * tensor.dim()
    view[0], view[dim] = batch, index.shape[1]
    size = list(tensor.shape)
    size[dim] = index.shape[1]
    return tensor.gather(dim, index.view(view).expand(size))


def mask_invalid_keys(mask: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """Hide invalid key columns in a 4-D attention mask, bool (True attends) or additive float."""
    hidden = ~key_valid[:, None, None, :]
    if mask.dtype == torch.bool:
        return mask & ~hidden
    return mask.masked_fill(hidden, torch.finfo(mask.dtype).min)


def causal_mask(query_index: torch.Tensor, key_index: torch.Tensor, key_valid: torch.Tensor, dtype) -> torch.Tensor:
    """A 4-D mask [B, 1, Q, K] letting each query see valid keys at or before its own source position."""
    allowed = (key_index[:, None, :] <= query_index[:, :, None]) & key_valid[:, None, :]
    allowed = allowed[:, None]
    if dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )
