"""Growing a real sparse collection to a larger size (e.g. MS MARCO's 8.8M passages) from its own vectors."""
from __future__ import annotations

import torch

from ..sparse import SparseBatch


def derive_documents(docs: SparseBatch, n: int, *, keep: float = 0.7, mix: float = 0.3, neighbours: int = 64,
                     jitter: float = 0.1, seed: int = 0, chunk: int = 200_000, progress: bool = True) -> SparseBatch:
    """``docs`` followed by ``n - len(docs)`` documents derived from them (ids of the real documents unchanged).

    Each new document takes a random real parent and a partner drawn among the parent's ``neighbours`` nearest
    documents in an order sorted by each document's two heaviest terms (a cheap topical neighbourhood). It keeps
    each of the parent's terms with probability ``keep`` and each of the partner's with probability ``mix`` (a term
    in both keeps the larger weight), and multiplies every weight by ``exp(N(0, jitter^2))``.

    Kept from the real vectors: which terms co-occur (every new vector is a blend of two topically close real
    ones), the distribution of weights (real weights, lightly jittered), the length distribution (about
    ``keep + mix`` times a real document's length before overlaps) and term popularity. Not kept: real novelty -
    each real document has about ``n / len(docs)`` near-relatives, so the collection is more clustered than a real
    one of that size, which makes pruning look easier than on real data; nor any relevance of the new documents.
    """
    if n < len(docs):
        raise ValueError(f"n: expected at least len(docs) = {len(docs)}, got {n}")
    if len(docs) == 0:
        raise ValueError("docs: empty")
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    docs = docs.to("cpu")
    indptr, indices, values = docs.indptr, docs.indices.long(), docs.values.float()
    lens = indptr.diff()
    # Sort key: the two heaviest terms of each document (ties of weight resolved by term id).
    rows = docs.row_ids()
    order_in_row = torch.argsort(rows * 1e6 - values.double(), stable=True)  # rows ascending, weight descending
    first = indptr[:-1].clamp(max=max(docs.nnz - 1, 0))
    top1 = torch.where(lens > 0, indices[order_in_row[first]], -1)
    second = (indptr[:-1] + 1).clamp(max=max(docs.nnz - 1, 0))
    top2 = torch.where(lens > 1, indices[order_in_row[second]], -1)
    sort_key = torch.argsort((top1 + 1) * (docs.dim + 1) + (top2 + 1), stable=True)
    position = torch.empty_like(sort_key)
    position[sort_key] = torch.arange(len(docs))

    parts = [docs]
    todo = n - len(docs)
    with tqdm(total=todo, desc="deriving documents", unit="doc", disable=not progress) as bar:
        while todo > 0:
            m = min(chunk, todo)
            parent = torch.randint(len(docs), (m,), generator=gen)
            offset = torch.randint(-neighbours, neighbours + 1, (m,), generator=gen)
            partner = sort_key[(position[parent] + offset).clamp(0, len(docs) - 1)]
            pieces = []
            for src, p in ((parent, keep), (partner, mix)):
                cnt = lens[src]
                row = torch.repeat_interleave(torch.arange(m), cnt)
                starts = torch.repeat_interleave(indptr[src], cnt)
                within = torch.arange(row.numel()) - torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt)
                pos = starts + within
                sel = torch.rand(pos.numel(), generator=gen) < p
                pieces.append((row[sel], indices[pos[sel]], values[pos[sel]]))
            row = torch.cat([x[0] for x in pieces])
            col = torch.cat([x[1] for x in pieces])
            val = torch.cat([x[2] for x in pieces]) * torch.exp(torch.randn(row.numel(), generator=gen) * jitter)
            key = row * docs.dim + col
            uniq, inv = torch.unique(key, sorted=True, return_inverse=True)
            merged = torch.zeros(uniq.numel()).scatter_reduce_(0, inv, val, "amax", include_self=False)
            new_rows = uniq // docs.dim
            counts = torch.bincount(new_rows, minlength=m)
            ptr = torch.zeros(m + 1, dtype=torch.int64)
            torch.cumsum(counts, 0, out=ptr[1:])
            parts.append(SparseBatch(ptr, (uniq % docs.dim).to(docs.indices.dtype), merged.to(docs.values.dtype),
                                     docs.dim, check=False))
            todo -= m
            bar.update(m)
    return SparseBatch.cat(parts)
