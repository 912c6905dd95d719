"""Tensor helpers strategies share: ranking, counting and products that also run inside a CUDA graph."""

from __future__ import annotations

import torch

__all__ = ["PAIRWISE_LIMIT", "ascending", "fp32_products", "top_k_in_order", "top_k_mask", "true_indices"]


def top_k_in_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, sorted ascending so kept tokens keep their original order ([n] -> [k],
    or a batch [B, n] -> [B, k])."""
    return true_indices(top_k_mask(scores, k), k)


#: Up to this many entries a compiled selection ranks scores (`top_k_mask`) and counts mask entries
#: (`true_indices`) pairwise: B x n x n comparisons, which inductor fuses into reductions without materialising
#: them. Beyond it, or run eagerly, a stable sort ranks and a scan counts.
PAIRWISE_LIMIT = 2048


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True at the k highest scores along the last dimension ([n] or [B, n]); of equal scores the first wins. In a
    compiled selection a score's rank is the number of higher ones and of equal ones before it, counted for every
    pair: on an H100 torch.topk's radix select took 9 us of each TransPrune stage (scripts/profile_prefill.py).
    Eagerly (a selection on the host, say) a stable sort is the cheaper way to the same ranks."""
    n = scores.shape[-1]
    if torch.compiler.is_compiling() and n <= PAIRWISE_LIMIT:
        order = torch.arange(n, device=scores.device)
        other, own = scores[..., None, :], scores[..., :, None]  # [.., i, j]: does score j rank above score i?
        # NaN ranks above every number, as in the sort: a NaN compares unequal to everything, so without this
        # each would count no score above it and the mask would hold more than k.
        other_nan, own_nan = other.isnan(), own.isnan()
        higher = (other > own) | (other_nan & ~own_nan)
        tied = (other == own) | (other_nan & own_nan)
        above = higher | (tied & (order[None, :] < order[:, None]))
        return above.sum(dim=-1) < k
    picked = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, picked, True)


def fp32_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b ([..., m, k] @ [..., k, n], the same leading dimensions) summed in fp32 from exact products, as
    attention kernels compute their scores. bf16 or fp16 operands on a GPU go to tensor cores, which multiply them
    exactly and accumulate in fp32 (bmm's out_dtype): cast to fp32 first, they ran on a SIMT kernel, 11 us of each
    TransPrune stage on an H100. Elsewhere they are cast."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype:
        lead = a.shape[:-2]
        product = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=torch.float32)
        return product.view(*lead, *product.shape[-2:])
    return a.float() @ b.float()


def ascending(indices: torch.Tensor, n: int) -> torch.Tensor:
    """Distinct indices into `n` positions, in ascending order ([k] or [B, k]): marked in a mask and read back in
    order. On a GPU that is a few fused kernels, where sorting them was one slow one (20 us for 448 indices on an
    H100, scripts/profile_prefill.py)."""
    mask = torch.zeros(*indices.shape[:-1], n, dtype=torch.bool, device=indices.device).scatter_(-1, indices, True)
    return true_indices(mask, indices.shape[-1])


def true_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the first `count` True entries of a mask, ascending, along its last dimension ([n] -> [count],
    [B, n] -> [B, count]). Unlike `mask.nonzero()` it never waits for the GPU to learn the count, so a
    selection using it can be captured in a CUDA graph. Where fewer are True, False entries follow, ascending.
    Each slot is found by counting, not sorting: the k-th True is where the running count of Trues first reaches
    k + 1, and so on for the Falses after them. (Placing every entry in its slot instead took a scatter kernel
    each time, 3 us on an H100.)"""
    n = mask.shape[-1]
    positions = torch.arange(n, device=mask.device)
    wanted = torch.arange(1, count + 1, device=mask.device).expand(*mask.shape[:-1], count).contiguous()
    if torch.compiler.is_compiling() and n <= PAIRWISE_LIMIT:
        # Counts as sums over pairs, which inductor fuses into parallel reductions. A scan (cumsum) it may split
        # across programs, and fused with a reduction after it, it failed that: "NYI TritonSplitDimKernel
        # reductions" (LearnPruner's greedy picks at batch 8 on an H100).
        trues_so_far = (mask[..., None, :] & (positions <= positions[:, None])).sum(-1)

        def first_reaching(counts: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return (counts[..., None, :] < targets[..., :, None]).sum(-1)
    else:
        trues_so_far = mask.long().cumsum(-1)
        first_reaching = torch.searchsorted  # a binary search of the non-decreasing counts
    falses_so_far = positions + 1 - trues_so_far
    total = trues_so_far[..., -1:]
    at_true = first_reaching(trues_so_far, wanted)
    at_false = first_reaching(falses_so_far, wanted - total)
    return torch.where(wanted <= total, at_true, at_false)
