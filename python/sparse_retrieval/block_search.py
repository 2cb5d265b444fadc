"""Block-max pruned search (safe and approximate) for `SparseIndex`.

After BMP (Mallia, Suel, Tonellotto, SIGIR 2024) and its superblocks (DSP, Carlson et al., SIGIR 2025). Documents
are put in a clustered order (hierarchical spherical k-means, `cluster_order`) so that similar ones are neighbours,
then cut into blocks of ``block_size``, and runs of ``superblock`` blocks form superblocks. Each term keeps an 8-bit
upper bound of its weight (``ceil(max / scale[t])``, ``scale[t]`` = the term's largest weight / 255) in every
superblock (term-major: a dense row of one byte per superblock for frequent terms, sparse (superblock, bound)
entries for the others) and in every block (superblock-major: each superblock lists its terms with one byte per
block; a superblock of one block needs no such list). A query bounds every superblock's score (sum of its positive
weights times the bounds), and scores blocks from a forward index in decreasing order of their bounds, bounding the
blocks of a superblock only once its bound is the largest left (a block's bound never exceeds its superblock's, so
the order is exactly that of all block bounds); it stops as soon as its k-th score exceeds ``alpha`` times the
largest bound left. ``alpha = 1`` is safe: the results are those of exhaustive search, scores bit for bit.
``alpha < 1`` trades recall for speed: the blocks scored for a smaller alpha are a prefix of those scored for a
larger one, so recall can only grow with alpha. Superblocks change the cost, not the blocks scored (bar ties that
rounding of the bounds breaks differently: terms with dense rows are added first, and which terms get one depends
on the superblock size): they pay on
large collections (8.8M documents: ``superblock=2`` 1.33x faster safe and 1.67x at alpha 0.9 than bounding every
block, 4 about 1.2x) and cost on small ones (203k: 0.57x at 2; 1M: 0.38x at 4), hence ``superblock="auto"``: 2 from
``AUTO_SUPERBLOCK_DOCS`` documents on, else 1 (docs/benchmarks.md). A second approximate knob, ``query_cut``,
computes the bounds from the query's ``query_cut`` terms of largest weight x maximum only (cheaper bounds, which
miss the other terms' share; scores still use every term). On large collections the term lists of
`term_lists.py` (after Seismic) replace the block maxima for approximate search: they read a few short lists
instead of bounding every block.

Safe search needs non-negative, finite document weights (learned sparse encoders produce these). Queries with
negative weights are fine (those terms only lower scores). A query that matches fewer than k documents with a
positive score, or has a non-finite weight, is answered by exhaustive search instead: exhaustive search also
returns documents that score 0, in id order, and the block structure does not track those.

The kernel is csrc/kernels/cpu/block_search.cpp (op ``torch.ops.sparse_retrieval.block_search``).
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, fields

import torch

from ._fake import check_range, fake
from .compact_terms import check_terms, compact_rows, uses_compact_terms
from .sparse import SparseBatch, as_long, cast_values, check_lists
from .term_lists import TermLists

_ops = torch.ops.sparse_retrieval


@dataclass
class BlockMax:
    """The forward index (stored order) and the maxima of the first ``ndocs`` documents of an index. Term t's bound
    on superblock s is ``value * scale[t]``, from a dense row (``sb_dense_row[t] >= 0``: that row of ``sb_dense``,
    one byte per superblock) or from the sparse (superblock, value) entries ``sb_ptr[t]:sb_ptr[t + 1]``; its bounds
    on the blocks of superblock s are ``superblock`` bytes at entry e of ``blk_values`` (viewed as rows of
    ``superblock``), where ``blk_terms[e] == t`` among ``blk_ptr[s]:blk_ptr[s + 1]``."""
    block_size: int
    superblock: int
    ndocs: int
    fwd_ptr: torch.Tensor      # int64 (ndocs + 1,)
    fwd_terms: torch.Tensor    # int16 (read as uint16, dim <= 65536) or int32 (nnz,), ascending per document
    fwd_weights: torch.Tensor  # the index's weight dtype (nnz,)
    doc_ids: torch.Tensor      # int64 (ndocs,): the id of the document stored at each position
    scale: torch.Tensor        # float32 (dim,)
    sb_dense_row: torch.Tensor  # int64 (dim,)
    sb_dense: torch.Tensor      # uint8 (rows * nsuper,)
    sb_ptr: torch.Tensor        # int64 (dim + 1,)
    sb_ids: torch.Tensor        # int32 (entries,)
    sb_values: torch.Tensor     # uint8 (entries,)
    blk_ptr: torch.Tensor       # int64 (nsuper + 1,)
    blk_terms: torch.Tensor     # fwd_terms' dtype (block entries,)
    blk_values: torch.Tensor    # uint8 (block entries * superblock,)
    # Over a huge dim (compact_terms.py): the sorted dimensions the documents hold, and every term array above
    # indexed by position in it; None: by dimension.
    terms: torch.Tensor | None = None
    # The structure of approximate search at scale (term_lists.py), when built.
    lists: TermLists | None = None
    # False: built without maxima (optimize(block_maxima=False): term lists only); the maxima arrays are then
    # empty (every bound 0) and safe search is refused.
    maxima: bool = True

    @property
    def nblocks(self) -> int:
        return -(-self.ndocs // self.block_size)

    @property
    def nsuper(self) -> int:
        return -(-self.nblocks // self.superblock)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors, in the order the op takes them."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in _SIZES and f.name not in ("terms", "lists", "maxima")}

    @property
    def nbytes(self) -> int:
        terms = () if self.terms is None else (self.terms,)
        lists = 0 if self.lists is None else self.lists.nbytes
        return sum(t.numel() * t.element_size() for t in (*self.tensors().values(), *terms)) + lists

    def search(self, queries: SparseBatch, k: int, alpha: float, threads: int, query_cut: int = 0,
               allowed: torch.Tensor | None = None, positions: torch.Tensor | None = None, lists: bool = False):
        """(scores, ids, complete, visited) of the kernel; rows whose ``complete`` is False must be searched
        exhaustively. ``query_cut`` > 0 bounds blocks with that many query terms only (approximate); ``allowed``
        (bool, one per document) restricts the candidates. With ``positions`` (see `positions_of`) the kernel
        scores exactly those documents (those of them that ``allowed`` lets through, when both are given) instead
        of pruning (``visited``: documents listed, not blocks). With ``lists`` the candidates come from the term
        lists (term_lists.py; ``query_cut`` terms' lists, ``alpha`` up to term_lists.MAX_ALPHA; ``visited``:
        groups scored)."""
        if self.terms is not None:
            queries = compact_rows(queries, self.terms)
        return _ops.block_search(queries.indptr, queries.indices, queries.values.detach(),
                                 list(self.tensors().values()), self.block_size, self.superblock, k, alpha,
                                 query_cut, threads, allowed, positions, self.lists.tensors() if lists else None)

    @functools.cached_property
    def term_counts(self) -> torch.Tensor:
        """Documents holding each term (int64, one per entry of ``scale``), counted once from the forward index."""
        return torch.bincount(as_long(self.fwd_terms), minlength=self.scale.numel())

    def positions_of(self, allowed: torch.Tensor) -> torch.Tensor:
        """The stored positions (ascending) of the documents whose ``allowed`` entry (bool, one per id) is set:
        one gather over all documents, in stored order so that the scan reads the forward index forwards."""
        return allowed[self.doc_ids].nonzero().flatten()

    def scan(self, queries: SparseBatch, k: int, threads: int, allowed: torch.Tensor | None = None):
        """Exhaustive search from the forward index alone (every document scored; the same results as the
        postings' exhaustive search, scores bit for bit): (scores, ids). Rows the kernel cannot score so (more
        than 255 terms, a non-finite weight) raise ValueError."""
        scores, ids, complete, _ = self.search(queries, k, 1.0, threads, 0, allowed, torch.arange(self.ndocs))
        if not bool(complete.all()):
            row = int((~complete).nonzero()[0])
            raise ValueError(f"queries: row {row} has more than 255 terms or a non-finite weight, which an index "
                             f"without postings (keep_postings=False) cannot score; keep the postings for such "
                             f"queries")
        return scores, ids

    def documents(self, lo: int, hi: int, dim: int) -> SparseBatch:
        """The documents with ids [lo, hi) rebuilt from the forward index (terms ascending, weights as stored), a
        million rows at a time so that the transient index arrays stay small."""
        position = torch.empty(self.ndocs, dtype=torch.int64)
        position[self.doc_ids] = torch.arange(self.ndocs)
        position = position[lo:hi]
        lengths = self.fwd_ptr[position + 1] - self.fwd_ptr[position]
        indptr = torch.zeros(hi - lo + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=indptr[1:])
        nnz = int(indptr[-1])
        indices = torch.empty(nnz, dtype=torch.int32 if dim < 2**31 else torch.int64)
        values = torch.empty(nnz, dtype=self.fwd_weights.dtype)
        step = 1 << 20
        for a in range(0, hi - lo, step):
            b = min(hi - lo, a + step)
            at, end = int(indptr[a]), int(indptr[b])
            flat = torch.repeat_interleave(self.fwd_ptr[position[a:b]] - indptr[a:b], lengths[a:b],
                                           output_size=end - at) + torch.arange(at, end)
            terms = as_long(self.fwd_terms[flat])
            indices[at:end] = terms if self.terms is None else self.terms[terms]
            values[at:end] = self.fwd_weights[flat]
        return SparseBatch(indptr, indices, values, dim, check=False)


_SIZES = ("block_size", "superblock", "ndocs")


AUTO_SUPERBLOCK_DOCS = 4_000_000  # measured: S = 1 faster at 1M documents, S = 2 at 8.8M; the switch is between


def resolve_superblock(superblock: int | str, ndocs: int) -> int:
    """``superblock`` as a number of blocks: ``"auto"`` is 2 from AUTO_SUPERBLOCK_DOCS documents on, else 1."""
    if superblock == "auto":
        return 2 if ndocs >= AUTO_SUPERBLOCK_DOCS else 1
    _check_int("superblock", superblock, 1024)
    return superblock


def build_block_max(docs: SparseBatch, dtype: torch.dtype, *, block_size: int = 8, superblock: int | str = "auto",
                    reorder: bool = True, order: torch.Tensor | None = None, dense_fraction: float = 0.125,
                    seed: int = 0, maxima: bool = True, progress: bool = True) -> BlockMax:
    """The block-max structure of ``docs`` (ids 0 .. len(docs) - 1), weights stored as ``dtype``.

    ``reorder`` clusters documents first (`cluster_order`); without it blocks follow the id order. ``order`` (a
    permutation of the ids, e.g. from recursive graph bisection or an earlier `cluster_order`) replaces both. A term whose
    sparse superblock entries would cover at least ``dense_fraction`` of the superblocks gets a dense row instead
    (faster bounds, at most 1 / (5 * dense_fraction) times the bytes of its sparse entries). ``maxima=False``
    builds the forward index and the scales alone (for term lists)."""
    _check_int("block_size", block_size, 1 << 20)
    superblock = resolve_superblock(superblock, len(docs))
    if not 0.0 < dense_fraction <= 1.0:
        raise ValueError(f"dense_fraction: expected a number in (0, 1], got {dense_fraction!r}")
    docs = docs.to("cpu")
    weights = cast_values(docs.values.detach(), dtype, "docs values")
    w = weights.float()
    if w.numel() and not bool(((w >= 0) & torch.isfinite(w)).all()):
        raise ValueError("docs: block-max search needs finite, non-negative document weights (use mode='exact')")
    docs = SparseBatch(docs.indptr, docs.indices, weights, docs.dim, check=False)
    held = None
    if uses_compact_terms(docs.dim):  # before clustering too, whose centroids are dense over dim
        held = torch.unique(docs.indices.long())
        docs = compact_rows(docs, held)
        docs = SparseBatch(docs.indptr, docs.indices, docs.values, max(1, held.numel()), check=False)
    n, dim = len(docs), docs.dim
    if order is not None:
        order = torch.as_tensor(order).cpu()
        if order.dtype.is_floating_point or order.dtype == torch.bool or order.shape != (n,) or \
                not torch.equal(torch.sort(order.long()).values, torch.arange(n)):
            raise ValueError(f"order: expected a permutation of the {n} document positions 0 .. {n - 1}")
    elif reorder and n > block_size:
        order = cluster_order(docs, leaf=block_size, seed=seed, progress=progress)
    else:
        order = torch.arange(n)
    # Permuted a million rows at a time: one fancy-indexing call over all postings builds three int64 arrays of
    # their size (about 14 GB for 8.8M documents, which ran the 24 GiB dev machine out of memory).
    step = 1 << 20
    fwd = SparseBatch.cat([docs[order[a:a + step]] for a in range(0, n, step)]) if n else docs
    terms = fwd.indices.to(torch.int16 if dim <= 65536 else torch.int32)  # int16 holds uint16 bits
    return with_maxima(dim, block_size, superblock, fwd.indptr, terms, fwd.values, order.long(), dense_fraction,
                       held, maxima)


def with_maxima(dim: int, block_size: int, superblock: int, fwd_ptr: torch.Tensor, fwd_terms: torch.Tensor,
                fwd_weights: torch.Tensor, doc_ids: torch.Tensor, dense_fraction: float = 0.125,
                terms: torch.Tensor | None = None, maxima: bool = True) -> BlockMax:
    """The block-max structure of a forward index over ``dim`` terms in stored order (maxima computed here, unless
    ``maxima`` is False: then only the scales, and empty maxima); with ``terms`` (see BlockMax.terms) the forward
    index's terms are positions in that list."""
    ndocs = fwd_ptr.numel() - 1
    if maxima:
        arrays = _ops.block_maxima(fwd_ptr, fwd_terms, fwd_weights, dim, block_size, superblock, dense_fraction)
    else:
        nsuper = -(-ndocs // (block_size * superblock))
        empty = torch.zeros(0, dtype=torch.uint8)
        arrays = (term_scales(fwd_terms, fwd_weights, dim), torch.full((dim,), -1), empty,
                  torch.zeros(dim + 1, dtype=torch.int64), torch.zeros(0, dtype=torch.int32), empty,
                  torch.zeros(nsuper + 1, dtype=torch.int64), fwd_terms.new_zeros(0), empty)
    return BlockMax(block_size, superblock, ndocs, fwd_ptr, fwd_terms, fwd_weights, doc_ids, *arrays, terms,
                    maxima=maxima)


def term_scales(fwd_terms: torch.Tensor, fwd_weights: torch.Tensor, dim: int) -> torch.Tensor:
    """Each term's largest weight / 255 (a hair above: quantized maxima then never round below a weight), or 1 for
    a term without postings: the ``scale`` the block_maxima kernel computes, bit for bit."""
    top = torch.zeros(dim, dtype=torch.float32).scatter_reduce_(0, as_long(fwd_terms), fwd_weights.float(), "amax")
    return torch.where(top > 0, (top.double() / 255.0 * (1.0 + 2.0**-20)).float(), 1.0)


def _check_int(name: str, value, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ValueError(f"{name}: expected an int in [1, {high}], got {value!r}")


def validate_forward(fwd_ptr: torch.Tensor, fwd_terms: torch.Tensor, fwd_weights: torch.Tensor,
                     doc_ids: torch.Tensor, dim: int, where: str) -> None:
    """The forward index's invariants (see `validate_block_max`)."""
    n = fwd_ptr.numel() - 1
    if n < 0 or fwd_weights.numel() != fwd_terms.numel() or fwd_terms.dtype not in (torch.int16, torch.int32) or \
            (fwd_terms.dtype == torch.int16 and dim > 65536):
        raise ValueError(f"{where}: forward index offsets are inconsistent")
    check_lists(fwd_ptr, as_long(fwd_terms), dim, where, "forward index (terms of each document)")
    if doc_ids.numel() != n or not torch.equal(torch.sort(doc_ids).values, torch.arange(n)):
        raise ValueError(f"{where}: document order is not a permutation of [0, {n})")
    w = fwd_weights.float()
    if w.numel() and not bool(((w >= 0) & torch.isfinite(w)).all()):
        raise ValueError(f"{where}: forward index weights must be finite and non-negative")


def validate_block_max(bm: BlockMax, dim: int, where: str) -> None:
    """The invariants the kernel relies on (memory safety and bit-identical scores), checked after loading."""
    if bm.terms is not None:
        check_terms(bm.terms, dim, where)
        dim = max(1, bm.terms.numel())
    ns = bm.nsuper
    if bm.fwd_ptr.numel() != bm.ndocs + 1:
        raise ValueError(f"{where}: forward index offsets are inconsistent")
    validate_forward(bm.fwd_ptr, bm.fwd_terms, bm.fwd_weights, bm.doc_ids, dim, where)
    if bm.scale.numel() != dim or not bool((torch.isfinite(bm.scale) & (bm.scale > 0)).all()):
        raise ValueError(f"{where}: block maxima scales are invalid")
    rows = bm.sb_dense.numel() // max(ns, 1)
    if bm.sb_dense_row.numel() != dim or (ns and bm.sb_dense.numel() != rows * ns) or \
            (dim and (int(bm.sb_dense_row.min()) < -1 or int(bm.sb_dense_row.max()) >= rows)):
        raise ValueError(f"{where}: dense superblock maxima rows are inconsistent")
    if bm.sb_ptr.numel() != dim + 1 or bm.sb_values.numel() != bm.sb_ids.numel():
        raise ValueError(f"{where}: sparse superblock maxima offsets are inconsistent")
    check_lists(bm.sb_ptr, bm.sb_ids, ns, where, "superblock maxima (superblocks of each term)")
    if bm.blk_ptr.numel() != ns + 1 or bm.blk_terms.dtype != bm.fwd_terms.dtype or \
            bm.blk_values.numel() != bm.blk_terms.numel() * bm.superblock:
        raise ValueError(f"{where}: block maxima offsets are inconsistent")
    check_lists(bm.blk_ptr, as_long(bm.blk_terms), dim, where, "block maxima (terms of each superblock)")


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
def _(q_indptr, q_indices, q_values, index, block_size, superblock, k, alpha, query_cut, num_threads, allowed=None,
      positions=None, lists=None):
    check_range(k, "k")
    nq = q_indptr.shape[0] - 1
    return (q_values.new_empty((nq, k), dtype=torch.float32), q_indptr.new_empty((nq, k)),
            q_indptr.new_empty((nq,), dtype=torch.bool), q_indptr.new_empty((nq,)))


@fake("block_maxima")
def _(fwd_ptr, fwd_terms, fwd_weights, dim, block_size, superblock, dense_fraction):
    ctx = torch.library.get_ctx()
    nsuper = (fwd_ptr.shape[0] - 1 + block_size * superblock - 1) // (block_size * superblock)
    dense, entries, blk_entries = ctx.new_dynamic_size(), ctx.new_dynamic_size(), ctx.new_dynamic_size()
    return (fwd_weights.new_empty((dim,), dtype=torch.float32), fwd_ptr.new_empty((dim,)),
            fwd_ptr.new_empty((dense,), dtype=torch.uint8), fwd_ptr.new_empty((dim + 1,)),
            fwd_ptr.new_empty((entries,), dtype=torch.int32), fwd_ptr.new_empty((entries,), dtype=torch.uint8),
            fwd_ptr.new_empty((nsuper + 1,)), fwd_terms.new_empty((blk_entries,)),
            fwd_ptr.new_empty((blk_entries * superblock,), dtype=torch.uint8))

