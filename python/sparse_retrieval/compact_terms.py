"""Compact term ids for indexes over a huge ``dim``.

An index's posting offsets (and the block-max structure's per-term arrays) are dense over the dimensions: 8 bytes
per dimension per segment, 512 MiB for ``dim = 2**26`` even with one document. Above ``COMPACT_DIM`` dimensions a
structure keeps ``terms``, the sorted dimensions its documents hold, and indexes its arrays by position in that list
instead. The map is order-preserving, so sorted rows stay sorted and the kernels add a query's products in the same
order (scores bit for bit as without it); query terms that no document holds are dropped before the kernels, since
they add nothing to any score. At or below ``COMPACT_DIM`` nothing changes (no lookup per search).
"""
from __future__ import annotations

import torch

from .sparse import SparseBatch

COMPACT_DIM = 1 << 20  # 8 MiB of offsets per segment at most; above, offsets follow the terms held


def uses_compact_terms(dim: int) -> bool:
    return dim > COMPACT_DIM


def merged_terms(terms: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The sorted union of ``terms`` (sorted, int64) and the dimensions in ``indices``."""
    return torch.unique(torch.cat([terms.cpu(), indices.cpu().long()]))


def compact_rows(batch: SparseBatch, terms: torch.Tensor) -> SparseBatch:
    """``batch``'s entries whose dimension is in ``terms`` (sorted, int64, on batch's device), renumbered to their
    position in ``terms``; the other entries are dropped. The result's dim is ``len(terms)``."""
    idx = batch.indices.long()
    pos = torch.searchsorted(terms, idx)
    if terms.numel():
        found = terms[pos.clamp(max=terms.numel() - 1)] == idx
    else:
        found = torch.zeros_like(idx, dtype=torch.bool)
    indptr, values = batch.indptr, batch.values
    if not bool(found.all()):  # terms no document holds are dropped (the common path above copies nothing)
        row = torch.repeat_interleave(torch.arange(len(batch), device=idx.device), batch.indptr.diff(),
                                      output_size=idx.numel())
        indptr = torch.zeros_like(batch.indptr)
        torch.cumsum(torch.bincount(row[found], minlength=len(batch)), 0, out=indptr[1:])
        pos, values = pos[found], values[found]
    return SparseBatch(indptr, pos.to(torch.int32), values, int(terms.numel()), check=False)


def widened_ptr(ptr: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Posting offsets over the terms ``old`` re-indexed over ``new`` (sorted, a superset of ``old``): the terms
    that only ``new`` holds get empty lists. The postings themselves do not move."""
    counts = torch.zeros(new.numel(), dtype=torch.int64, device=ptr.device)
    counts[torch.searchsorted(new.to(ptr.device), old.to(ptr.device))] = ptr.diff()
    out = torch.zeros(new.numel() + 1, dtype=torch.int64, device=ptr.device)
    torch.cumsum(counts, 0, out=out[1:])
    return out


def check_terms(terms: torch.Tensor, dim: int, where: str) -> None:
    """Raises ValueError unless ``terms`` (read from a file) is a strictly increasing int64 list within [0, dim)."""
    if terms.dtype != torch.int64 or terms.dim() != 1 or (terms.numel() and (
            int(terms[0]) < 0 or int(terms[-1]) >= dim or not bool((terms.diff() > 0).all()))):
        raise ValueError(f"{where}: the list of terms held is not strictly increasing within [0, {dim})")
