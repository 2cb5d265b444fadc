"""Block-max pruned search (safe and approximate) for `SparseIndex`.

After BMP (Mallia, Suel, Tonellotto, SIGIR 2024). Documents are put in a clustered order (hierarchical spherical
k-means, `cluster_order`) so that similar ones are neighbours, then cut into blocks of ``block_size``. Each term
keeps an 8-bit upper bound of its weight in every block (``ceil(max / scale[t])``, ``scale[t]`` = the term's
largest weight / 255): a dense row of one byte per block for frequent terms, sparse (block, bound) entries for the
others. A query bounds every block's score (sum of its positive weights times the block bounds), visits blocks in
decreasing bound order (bucketed), scores each visited block's documents from a forward index, and stops as soon
as its k-th score exceeds ``alpha`` times the largest bound left. ``alpha = 1`` is safe: the results are those of
exhaustive search, scores bit for bit. ``alpha < 1`` trades recall for speed; the blocks visited for a smaller
alpha are a prefix of those visited for a larger one, so recall can only grow with alpha. A second approximate
knob, ``query_cut``, computes the bounds from the query's ``query_cut`` terms of largest weight x maximum only
(cheaper bounds, which miss the other terms' share; scores still use every term).

Safe search needs non-negative, finite document weights (learned sparse encoders produce these). Queries with
negative weights are fine (those terms only lower scores). A query that matches fewer than k documents with a
positive score, or has a non-finite weight, is answered by exhaustive search instead: exhaustive search also
returns documents that score 0, in id order, and the block structure does not track those.

The kernel is csrc/kernels/cpu/block_search.cpp (op ``torch.ops.sparse_retrieval.block_search``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, fields

import torch

from ._fake import fake
from .sparse import SparseBatch, cast_values, check_lists

_ops = torch.ops.sparse_retrieval


@dataclass
class BlockMax:
    """The forward index (stored order) and the block maxima of the first ``ndocs`` documents of an index: term
    t's bound on block b is ``value * scale[t]``, from a dense row (``bm_dense_row[t] >= 0``: that row of
    ``bm_dense``, one byte per block) or from the sparse (block, value) entries ``bm_ptr[t]:bm_ptr[t + 1]``."""
    block_size: int
    ndocs: int
    fwd_ptr: torch.Tensor      # int64 (ndocs + 1,)
    fwd_terms: torch.Tensor    # int16 (read as uint16, dim <= 65536) or int32 (nnz,), ascending per document
    fwd_weights: torch.Tensor  # the index's weight dtype (nnz,)
    doc_ids: torch.Tensor      # int64 (ndocs,): the id of the document stored at each position
    scale: torch.Tensor        # float32 (dim,)
    bm_dense_row: torch.Tensor  # int64 (dim,)
    bm_dense: torch.Tensor      # uint8 (rows * nblocks,)
    bm_ptr: torch.Tensor        # int64 (dim + 1,)
    bm_blocks: torch.Tensor     # int32 (entries,)
    bm_values: torch.Tensor     # uint8 (entries,)

    @property
    def nblocks(self) -> int:
        return -(-self.ndocs // self.block_size)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors, in the order the op takes them."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _SIZES}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def search(self, queries: SparseBatch, k: int, alpha: float, threads: int, query_cut: int = 0,
               allowed: torch.Tensor | None = None):
        """(scores, ids, complete, blocks_visited) of the kernel; rows whose ``complete`` is False must be
        searched exhaustively. ``query_cut`` > 0 bounds blocks with that many query terms only (approximate);
        ``allowed`` (bool, one per document) restricts the candidates."""
        return _ops.block_search(queries.indptr, queries.indices, queries.values.detach(),
                                 list(self.tensors().values()), self.block_size, k, alpha, query_cut, threads,
                                 allowed)


_SIZES = ("block_size", "ndocs")


def build_block_max(docs: SparseBatch, dtype: torch.dtype, *, block_size: int = 8, reorder: bool = True,
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
    weights = cast_values(docs.values.detach(), dtype, "docs values")
    w = weights.float()
    if w.numel() and not bool(((w >= 0) & torch.isfinite(w)).all()):
        raise ValueError("docs: block-max search needs finite, non-negative document weights (use mode='exact')")
    docs = SparseBatch(docs.indptr, docs.indices, weights, docs.dim, check=False)
    n, dim = len(docs), docs.dim
    order = cluster_order(docs, leaf=block_size, seed=seed, progress=progress) if reorder and n > block_size \
        else torch.arange(n)
    # Permuted a million rows at a time: one fancy-indexing call over all postings builds three int64 arrays of
    # their size (about 14 GB for 8.8M documents, which ran the 24 GiB dev machine out of memory).
    step = 1 << 20
    fwd = SparseBatch.cat([docs[order[a:a + step]] for a in range(0, n, step)]) if n else docs
    terms = fwd.indices.to(torch.int16 if dim <= 65536 else torch.int32)  # int16 holds uint16 bits
    scale, *maxima = _ops.block_maxima(fwd.indptr, terms, fwd.values, dim, block_size, dense_fraction)
    return BlockMax(block_size, n, fwd.indptr, terms, fwd.values, order.long(), scale, *maxima)


def validate_block_max(bm: BlockMax, dim: int, where: str) -> None:
    """The invariants the kernel relies on (memory safety and bit-identical scores), checked after loading."""
    n, nb = bm.ndocs, bm.nblocks
    if bm.fwd_ptr.numel() != n + 1 or bm.fwd_weights.numel() != bm.fwd_terms.numel():
        raise ValueError(f"{where}: forward index offsets are inconsistent")
    terms = bm.fwd_terms.long() & 0xFFFF if bm.fwd_terms.dtype == torch.int16 else bm.fwd_terms.long()
    check_lists(bm.fwd_ptr, terms, dim, where, "forward index (terms of each document)")
    if bm.doc_ids.numel() != n or not torch.equal(torch.sort(bm.doc_ids).values, torch.arange(n)):
        raise ValueError(f"{where}: document order is not a permutation of [0, {n})")
    w = bm.fwd_weights.float()
    if w.numel() and not bool(((w >= 0) & torch.isfinite(w)).all()):
        raise ValueError(f"{where}: forward index weights must be finite and non-negative")
    if bm.scale.numel() != dim or not bool((torch.isfinite(bm.scale) & (bm.scale > 0)).all()):
        raise ValueError(f"{where}: block maxima scales are invalid")
    rows = bm.bm_dense.numel() // max(nb, 1)
    if bm.bm_dense_row.numel() != dim or (nb and bm.bm_dense.numel() != rows * nb) or \
            (dim and (int(bm.bm_dense_row.min()) < -1 or int(bm.bm_dense_row.max()) >= rows)):
        raise ValueError(f"{where}: dense block maxima rows are inconsistent")
    if bm.bm_ptr.numel() != dim + 1 or bm.bm_values.numel() != bm.bm_blocks.numel():
        raise ValueError(f"{where}: sparse block maxima offsets are inconsistent")
    check_lists(bm.bm_ptr, bm.bm_blocks, nb, where, "sparse block maxima (blocks of each term)")


def cluster_order(docs: SparseBatch, leaf: int = 8, fanout: int = 64, iters: int = 6, sample: int = 65536,
                  seed: int = 0, progress: bool = True) -> torch.Tensor:
    """A permutation of ``docs``' rows that puts similar documents next to each other: hierarchical spherical
    k-means (cosine similarity against dense centroids), up to ``fanout`` clusters per level (no more than it takes
    to reach groups of 512) fitted on up to ``sample`` rows for ``iters`` rounds, recursing until a group holds at
    most ``leaf`` documents. Groups of at most 512 documents are finished on a dense matrix over their own terms
    (``fanout`` 8), and groups of at most 64 by sorting on their heaviest two terms (on 45k WordNet passages: 2.2x faster to build than k-means down to 8
    documents, 5% more blocks visited). A cheaper stand-in for recursive graph bisection: O(levels x iters x nnz x
    fanout) work; memory beyond ``docs``: one level's copy of the rows."""
    from tqdm.auto import tqdm

    n = len(docs)
    gen = torch.Generator().manual_seed(seed)
    out = []
    stack = [None]  # None: all of docs, without a copy
    with tqdm(total=n, desc="clustering documents", unit="doc", disable=not progress) as bar:
        while stack:
            ids = stack.pop()
            x = docs if ids is None else docs[ids]
            ids = torch.arange(n) if ids is None else ids
            if len(x) <= _DENSE_GROUP:
                x = _unit_rows(x)
                terms, local = torch.unique(x.indices.long(), return_inverse=True)
                dense = torch.zeros(len(x), terms.numel())
                dense[x.row_ids(), local] = x.values
                out.append(ids[_cluster_dense(dense, leaf, iters, gen)])
                bar.update(len(x))
                continue
            # no more clusters than needed to bring the children down to dense-group size
            labels = _spherical_kmeans(x, min(fanout, -(-len(x) // _DENSE_GROUP)), iters, sample, gen)
            del x
            counts = torch.bincount(labels).tolist()
            if max(counts) == ids.numel():  # no split found (identical vectors): cut in id order instead
                stack.extend(reversed(torch.split(ids, _DENSE_GROUP)))
                continue
            parts = [p for p in torch.split(ids[torch.argsort(labels, stable=True)], counts) if p.numel()]
            stack.extend(reversed(parts))  # depth first, so that the output keeps sibling clusters together
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


_DENSE_GROUP = 512
_SORT_GROUP = 64
_CHUNK = 65536


def _unit_rows(x: SparseBatch) -> SparseBatch:
    rows = x.row_ids()
    norms = torch.zeros(len(x)).index_add_(0, rows, x.values.float() ** 2).sqrt_().clamp_(min=1e-30)
    return SparseBatch(x.indptr, x.indices, x.values.float() / norms[rows], x.dim, check=False)


def _cluster_dense(x: torch.Tensor, leaf: int, iters: int, gen: torch.Generator, fanout: int = 8) -> torch.Tensor:
    """Order of the rows of a small dense matrix of unit vectors, by recursive k-means with ``fanout`` clusters."""
    n = x.shape[0]
    if n <= leaf or x.shape[1] == 0:  # small, or documents without terms (nothing to tell them apart)
        return torch.arange(n)
    if n <= _SORT_GROUP:  # small groups: by heaviest term, then second heaviest (k-means this deep costs more)
        top = x.topk(min(2, x.shape[1]), dim=1).indices
        key = top[:, 0] * (x.shape[1] + 1) + (top[:, 1] if top.shape[1] > 1 else 0)
        return torch.argsort(key, stable=True)
    c = min(fanout, -(-n // leaf))
    cent = x[torch.randperm(n, generator=gen)[:c]]
    for _ in range(iters):
        labels = (x @ cent.T).argmax(1)
        cent = torch.zeros_like(cent).index_add_(0, labels, x)
        cent /= cent.norm(dim=1, keepdim=True).clamp_(min=1e-30)
    labels = (x @ cent.T).argmax(1)
    counts = torch.bincount(labels, minlength=c)
    if int(counts.max()) == n:  # no split: keep the order
        return torch.arange(n)
    order = torch.argsort(labels, stable=True)
    parts = [p for p in torch.split(order, counts.tolist()) if p.numel()]
    return torch.cat([p[_cluster_dense(x[p], leaf, iters, gen, fanout)] for p in parts])


def _spherical_kmeans(x: SparseBatch, c: int, iters: int, sample: int, gen: torch.Generator) -> torch.Tensor:
    """Cluster labels of x's rows: centroids fitted on a sample of unit rows, then every row assigned in chunks
    (the nearest centroid by cosine is the largest dot product: rows need no normalising for that)."""
    n = len(x)
    fit = _unit_rows(x if n <= sample else x[torch.randperm(n, generator=gen)[:sample]])
    mat = _csr(fit)
    rows, cols, vals = fit.row_ids(), fit.indices.long(), fit.values
    cent = _csr(fit[torch.randperm(len(fit), generator=gen)[:c]]).to_dense()
    for _ in range(iters):
        labels = torch.sparse.mm(mat, cent.T).argmax(1)
        cent = torch.zeros(cent.shape[0], x.dim).index_put_((labels[rows], cols), vals, accumulate=True)
        cent /= cent.norm(dim=1, keepdim=True).clamp_(min=1e-30)
    return torch.cat([torch.sparse.mm(_csr(x[a:a + _CHUNK]), cent.T).argmax(1) for a in range(0, n, _CHUNK)])


def _csr(x: SparseBatch) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(x.indptr, x.indices.long(), x.values.float(), (len(x), x.dim))


@fake("block_search")
def _(q_indptr, q_indices, q_values, index, block_size, k, alpha, query_cut, num_threads, allowed=None):
    nq = q_indptr.shape[0] - 1
    return (q_values.new_empty((nq, k), dtype=torch.float32), q_indptr.new_empty((nq, k)),
            q_indptr.new_empty((nq,), dtype=torch.bool), q_indptr.new_empty((nq,)))


@fake("block_maxima")
def _(fwd_ptr, fwd_terms, fwd_weights, dim, block_size, dense_fraction):
    ctx = torch.library.get_ctx()
    nblocks = (fwd_ptr.shape[0] - 1 + block_size - 1) // block_size
    rows, entries = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    return (fwd_weights.new_empty((dim,), dtype=torch.float32), fwd_ptr.new_empty((dim,)),
            fwd_ptr.new_empty((rows * nblocks,), dtype=torch.uint8), fwd_ptr.new_empty((dim + 1,)),
            fwd_ptr.new_empty((entries,), dtype=torch.int32), fwd_ptr.new_empty((entries,), dtype=torch.uint8))
