"""Block-max pruned search (safe and approximate) for `SparseIndex`.

After BMP (Mallia, Suel, Tonellotto, SIGIR 2024). Documents are put in a clustered order (hierarchical spherical
k-means, `cluster_order`) so that similar ones are neighbours, then cut into blocks of ``block_size``. Each term
keeps an 8-bit upper bound of its weight in every block (``ceil(max / scale[t])``, ``scale[t]`` = the term's
largest weight / 255): a dense row of one byte per block for frequent terms, sparse (block, bound) entries for the
others. A query bounds every block's score (sum of its positive weights times the block bounds), visits blocks in
decreasing bound order (bucketed), scores each visited block's documents from a forward index, and stops as soon
as its k-th score exceeds ``alpha`` times the largest bound left. ``alpha = 1`` is safe: the results are those of
exhaustive search, scores bit for bit. ``alpha < 1`` trades recall for speed; the blocks visited for a smaller
alpha are a prefix of those visited for a larger one, so recall can only grow with alpha.

Safe search needs non-negative, finite document weights (learned sparse encoders produce these). Queries with
negative weights are fine (those terms only lower scores). A query that matches fewer than k documents with a
positive score, or has a non-finite weight, is answered by exhaustive search instead: exhaustive search also
returns documents that score 0, in id order, and the block structure does not track those.

The kernel is csrc/kernels/cpu/block_search.cpp (op ``torch.ops.sparse_retrieval.block_search``).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields

import torch

from .sparse import SparseBatch

_ops = torch.ops.sparse_retrieval


@dataclass
class BlockMax:
    """The forward index (stored order) and the block maxima of the first ``ndocs`` documents of an index."""
    block_size: int
    ndocs: int
    fwd_ptr: torch.Tensor      # int64 (ndocs + 1,)
    fwd_terms: torch.Tensor    # int16 (read as uint16, dim <= 65536) or int32 (nnz,), ascending per document
    fwd_weights: torch.Tensor  # the index's weight dtype (nnz,)
    doc_ids: torch.Tensor      # int64 (ndocs,): the id of the document stored at each position
    scale: torch.Tensor        # float32 (dim,)
    dense_row: torch.Tensor    # int64 (dim,): row in bm_dense, or -1 for a term with sparse entries
    bm_dense: torch.Tensor     # uint8 (rows * nblocks,)
    bm_ptr: torch.Tensor       # int64 (dim + 1,)
    bm_blocks: torch.Tensor    # int32 (entries,)
    bm_values: torch.Tensor    # uint8 (entries,)

    @property
    def nblocks(self) -> int:
        return -(-self.ndocs // self.block_size)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("block_size", "ndocs")}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def search(self, queries: SparseBatch, k: int, alpha: float, threads: int):
        """(scores, ids, complete, blocks_visited) of the kernel; rows whose ``complete`` is False must be
        searched exhaustively."""
        return _ops.block_search(queries.indptr, queries.indices, queries.values.detach(), self.fwd_ptr,
                                 self.fwd_terms, self.fwd_weights, self.doc_ids, self.scale, self.dense_row,
                                 self.bm_dense, self.bm_ptr, self.bm_blocks, self.bm_values, self.block_size, k,
                                 alpha, threads)


def build_block_max(docs: SparseBatch, dtype: torch.dtype, *, block_size: int = 32, reorder: bool = True,
                    dense_fraction: float = 0.125, seed: int = 0, progress: bool = True) -> BlockMax:
    """The block-max structure of ``docs`` (ids 0 .. len(docs) - 1), weights stored as ``dtype``.

    ``reorder`` clusters documents first (`cluster_order`); without it blocks follow the id order. A term whose
    sparse entries would cover at least ``dense_fraction`` of the blocks gets a dense row instead (faster bounds,
    at most 1 / (5 * dense_fraction) times the bytes of its sparse entries)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not 1 <= block_size <= 1 << 20:
        raise ValueError(f"block_size: expected an int in [1, 2^20], got {block_size!r}")
    if not 0.0 < dense_fraction <= 1.0:
        raise ValueError(f"dense_fraction: expected a number in (0, 1], got {dense_fraction!r}")
    docs = docs.to("cpu")
    weights = docs.values.detach().to(dtype)
    if weights.numel() and not bool(((weights.float() >= 0) & torch.isfinite(weights.float())).all()):
        raise ValueError("docs: block-max search needs finite, non-negative document weights (use mode='exact')")
    docs = SparseBatch(docs.indptr, docs.indices, weights, docs.dim, check=False)
    n, dim = len(docs), docs.dim
    order = cluster_order(docs, leaf=block_size, seed=seed, progress=progress) if reorder and n > block_size \
        else torch.arange(n)
    fwd = docs[order]
    terms = fwd.indices.to(torch.int16 if dim <= 65536 else torch.int32)  # int16 holds uint16 bits
    nblocks = -(-n // block_size)
    w = fwd.values.float()
    cols = fwd.indices.long()
    block = torch.repeat_interleave(torch.arange(n) // block_size, fwd.row_nnz(), output_size=fwd.nnz)
    tmax = torch.zeros(dim).scatter_reduce_(0, cols, w, "amax", include_self=True)
    # scale slightly above max / 255 so that the largest weight still quantizes to at most 255
    scale = torch.where(tmax > 0, tmax / 255 * (1 + 2**-20), torch.ones(()))
    key = cols * nblocks + block
    uniq, inv = torch.unique(key, sorted=True, return_inverse=True)
    bmax = torch.zeros(uniq.numel()).scatter_reduce_(0, inv, w, "amax", include_self=True)
    uterm, ublock = uniq // nblocks, (uniq % nblocks).to(torch.int32)
    q = torch.ceil(bmax / scale[uterm]).clamp_(0, 255)
    while True:  # the kernel dequantizes as q * scale in float32: make that an upper bound exactly
        low = q * scale[uterm] < bmax
        if not bool(low.any()):
            break
        q[low] += 1
    if bool((q > 255).any()):
        raise AssertionError("block maxima: quantized bound above 255")  # scale makes this impossible
    q = q.to(torch.uint8)
    count = torch.bincount(uterm, minlength=dim)
    dense = count >= max(1, math.ceil(dense_fraction * nblocks))
    dense_row = torch.full((dim,), -1, dtype=torch.int64)
    dense_terms = dense.nonzero().flatten()
    dense_row[dense_terms] = torch.arange(dense_terms.numel())
    bm_dense = torch.zeros(dense_terms.numel() * nblocks, dtype=torch.uint8)
    in_dense = dense[uterm]
    bm_dense[dense_row[uterm[in_dense]] * nblocks + ublock[in_dense].long()] = q[in_dense]
    sparse_count = torch.where(dense, 0, count)
    bm_ptr = torch.zeros(dim + 1, dtype=torch.int64)
    torch.cumsum(sparse_count, 0, out=bm_ptr[1:])
    return BlockMax(block_size, n, fwd.indptr.clone(), terms, fwd.values, order.long(), scale.float(), dense_row,
                    bm_dense, bm_ptr, ublock[~in_dense].contiguous(), q[~in_dense].contiguous())


def validate_block_max(bm: BlockMax, dim: int, where: str) -> None:
    """The invariants the kernel relies on (memory safety and bit-identical scores), checked after loading."""
    n, nb = bm.ndocs, bm.nblocks
    ptr = bm.fwd_ptr
    if ptr.numel() != n + 1 or int(ptr[0]) != 0 or int(ptr[-1]) != bm.fwd_terms.numel() or \
            bool((ptr.diff() < 0).any()) or bm.fwd_weights.numel() != bm.fwd_terms.numel():
        raise ValueError(f"{where}: forward index offsets are inconsistent")
    terms = bm.fwd_terms.long() & 0xFFFF if bm.fwd_terms.dtype == torch.int16 else bm.fwd_terms.long()
    if terms.numel():
        if int(terms.min()) < 0 or int(terms.max()) >= dim:
            raise ValueError(f"{where}: forward index terms out of range [0, {dim})")
        starts = torch.zeros(terms.numel(), dtype=torch.bool)
        starts[ptr[:-1][ptr.diff() > 0]] = True
        if bool(((terms[1:] <= terms[:-1]) & ~starts[1:]).any()):
            raise ValueError(f"{where}: forward index terms not ascending within a document")
    if bm.doc_ids.numel() != n or not torch.equal(torch.sort(bm.doc_ids).values, torch.arange(n)):
        raise ValueError(f"{where}: document order is not a permutation of [0, {n})")
    w = bm.fwd_weights.float()
    if w.numel() and not bool(((w >= 0) & torch.isfinite(w)).all()):
        raise ValueError(f"{where}: forward index weights must be finite and non-negative")
    if bm.scale.numel() != dim or not bool((torch.isfinite(bm.scale) & (bm.scale > 0)).all()):
        raise ValueError(f"{where}: block maxima scales are invalid")
    rows = bm.bm_dense.numel() // max(nb, 1)
    if bm.dense_row.numel() != dim or (nb and bm.bm_dense.numel() != rows * nb) or \
            (dim and (int(bm.dense_row.min()) < -1 or int(bm.dense_row.max()) >= rows)):
        raise ValueError(f"{where}: dense block maxima rows are inconsistent")
    bp = bm.bm_ptr
    if bp.numel() != dim + 1 or int(bp[0]) != 0 or int(bp[-1]) != bm.bm_blocks.numel() or \
            bool((bp.diff() < 0).any()) or bm.bm_values.numel() != bm.bm_blocks.numel():
        raise ValueError(f"{where}: sparse block maxima offsets are inconsistent")
    if bm.bm_blocks.numel() and (int(bm.bm_blocks.min()) < 0 or int(bm.bm_blocks.max()) >= nb):
        raise ValueError(f"{where}: block numbers out of range [0, {nb})")


def cluster_order(docs: SparseBatch, leaf: int = 32, fanout: int = 64, iters: int = 6, sample: int = 65536,
                  seed: int = 0, progress: bool = True) -> torch.Tensor:
    """A permutation of ``docs``' rows that puts similar documents next to each other: hierarchical spherical
    k-means (cosine similarity of the sparse vectors against dense centroids), ``fanout`` clusters per level fitted
    on up to ``sample`` rows for ``iters`` rounds, recursing until a group holds at most ``leaf`` documents.
    A cheaper stand-in for recursive graph bisection: O(levels x iters x nnz x fanout) work."""
    from tqdm.auto import tqdm

    n = len(docs)
    gen = torch.Generator().manual_seed(seed)
    norms = torch.zeros(n).index_add_(0, docs.row_ids(), docs.values.float() ** 2).sqrt_().clamp_(min=1e-30)
    unit = SparseBatch(docs.indptr, docs.indices, docs.values.float() / norms[docs.row_ids()], docs.dim, check=False)
    out = []
    stack = [torch.arange(n)]
    with tqdm(total=n, desc="clustering documents", unit="doc", disable=not progress) as bar:
        while stack:
            ids = stack.pop()
            if ids.numel() <= leaf:
                out.append(ids)
                bar.update(ids.numel())
                continue
            labels = _spherical_kmeans(unit[ids], min(fanout, -(-ids.numel() // leaf)), iters, sample, gen)
            order = torch.argsort(labels, stable=True)
            counts = torch.bincount(labels).tolist()
            if max(counts) == ids.numel():  # identical vectors: no split possible
                out.append(ids)
                bar.update(ids.numel())
                continue
            parts = [p for p in torch.split(ids[order], counts) if p.numel()]
            stack.extend(reversed(parts))  # depth first, so that the output keeps sibling clusters together
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def _spherical_kmeans(x: SparseBatch, c: int, iters: int, sample: int, gen: torch.Generator) -> torch.Tensor:
    n = len(x)
    fit = x if n <= sample else x[torch.randperm(n, generator=gen)[:sample]]
    mat = _csr(fit)
    rows, cols, vals = fit.row_ids(), fit.indices.long(), fit.values
    cent = _csr(fit[torch.randperm(len(fit), generator=gen)[:c]]).to_dense()
    for _ in range(iters):
        labels = torch.sparse.mm(mat, cent.T).argmax(1)
        cent = torch.zeros(c, x.dim).index_put_((labels[rows], cols), vals, accumulate=True)
        cent /= cent.norm(dim=1, keepdim=True).clamp_(min=1e-30)
    return torch.sparse.mm(_csr(x), cent.T).argmax(1) if fit is not x else labels


def _csr(x: SparseBatch) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(x.indptr, x.indices.long(), x.values.float(), (len(x), x.dim))


@torch.library.register_fake("sparse_retrieval::block_search")
def _(q_indptr, q_indices, q_values, fwd_ptr, fwd_terms, fwd_weights, doc_ids, scale, dense_row, bm_dense, bm_ptr,
      bm_blocks, bm_values, block_size, k, alpha, num_threads):
    nq = q_indptr.shape[0] - 1
    return (q_values.new_empty((nq, k), dtype=torch.float32), q_indptr.new_empty((nq, k)),
            q_indptr.new_empty((nq,), dtype=torch.bool), q_indptr.new_empty((nq,)))
