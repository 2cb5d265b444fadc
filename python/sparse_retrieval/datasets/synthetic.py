"""Synthetic data with the statistics of real learned sparse embeddings."""
from __future__ import annotations

import math
import numbers

import torch

from ..sparse import SparseBatch


def _popularity(dim: int, exponent: float, gen: torch.Generator) -> torch.Tensor:
    """Zipf-like probability of each dimension appearing in a vector, randomly assigned to dimensions."""
    ranks = torch.arange(1, dim + 1, dtype=torch.float64, device=gen.device)
    p = (ranks + 10.0).pow(-exponent)  # the offset flattens the head, as in SPLADE term statistics
    return (p / p.sum())[torch.randperm(dim, generator=gen, device=gen.device)]


def _sample_rows(n: int, mean_nnz: int, cdf: torch.Tensor, gen: torch.Generator, chunk: int = 8192) -> tuple:
    dim = cdf.numel()
    idx_parts, counts_parts = [], []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        # Row lengths vary like real encoders' (log-normal with mean mean_nnz), at least 1, at most dim.
        sigma = 0.35
        target = torch.exp(torch.randn(m, generator=gen, dtype=torch.float64, device=gen.device) * sigma
                           - sigma**2 / 2) * mean_nnz
        target = target.round().clamp_(min(1, mean_nnz), dim).long()
        draws = int(target.max()) * 2 + 16
        cols = torch.searchsorted(cdf, torch.rand(m, draws, generator=gen, dtype=torch.float64, device=gen.device))
        cols = cols.clamp_(max=dim - 1)
        # Keep each row's first `target` distinct columns (in draw order), then sort them.
        cols, order = torch.sort(cols, dim=1, stable=True)
        fresh = torch.ones_like(cols, dtype=torch.bool)
        fresh[:, 1:] = cols[:, 1:] != cols[:, :-1]
        # In draw order: is this draw a column's first appearance, and how many first appearances so far?
        new = torch.zeros_like(fresh).scatter_(1, order, fresh)
        kept = new & (torch.cumsum(new, 1) <= target[:, None])
        keep = kept.gather(1, order)
        counts_parts.append(keep.sum(1))
        idx_parts.append(cols[keep])
    return torch.cat(idx_parts), torch.cat(counts_parts)


def _weights(n: int, gen: torch.Generator) -> torch.Tensor:
    # SPLADE weights are log(1 + relu(logit)): positive, mostly below 3, with a long upper tail.
    return torch.log1p(torch.exp(torch.randn(n, generator=gen, device=gen.device) * 0.8 + 0.3)).float()


def synthetic_splade(n_docs: int, n_queries: int, dim: int = 30522, doc_nnz: int = 120, query_nnz: int = 50,
                     seed: int = 0, zipf_exponent: float = 1.1,
                     device: str | torch.device = "cpu") -> tuple[SparseBatch, SparseBatch]:
    """Random (documents, queries) shaped like SPLADE on MS MARCO.

    Dimension popularity follows a Zipf-like law (exponent ``zipf_exponent``) shared by documents and queries,
    row lengths are log-normal around ``doc_nnz`` / ``query_nnz``, weights are positive and skewed. Indices are
    int32 and sorted, values float32, both on the CPU. Deterministic for a given ``seed`` and ``device``, the device
    that draws them (a GPU draws MS MARCO's 8.8M documents in seconds; other numbers than the CPU's).
    """
    for name, v in (("n_docs", n_docs), ("n_queries", n_queries), ("doc_nnz", doc_nnz), ("query_nnz", query_nnz),
                    ("dim", dim), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v < 0 and name != "seed":
            raise ValueError(f"{name} must be >= 0, got {v}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if not (isinstance(zipf_exponent, (int, float)) and 0 <= zipf_exponent < math.inf):
        raise ValueError(f"zipf_exponent must be a finite number >= 0, got {zipf_exponent!r}")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    try:
        gen = torch.Generator(device=torch.device(device)).manual_seed(seed)
    except RuntimeError as exc:  # an unknown device, or one this torch has no generator for
        raise ValueError(f"device: cannot draw on {str(device)!r}: {str(exc).splitlines()[0]}") from None
    cdf = torch.cumsum(_popularity(dim, zipf_exponent, gen), 0)
    cdf[-1] = 1.0

    def batch(n, nnz):
        idx, counts = _sample_rows(n, nnz, cdf, gen) if n else (torch.zeros(0, dtype=torch.long),
                                                                torch.zeros(0, dtype=torch.long))
        indptr = torch.zeros(n + 1, dtype=torch.int64)
        torch.cumsum(counts.cpu(), 0, out=indptr[1:])
        return SparseBatch(indptr, idx.to(torch.int32).cpu(), _weights(idx.numel(), gen).cpu(), dim, check=False)

    return batch(n_docs, doc_nnz), batch(n_queries, query_nnz)
