"""`SparseIndex`: an exact inverted index over sparse documents, searched by dot product.

Postings are kept per dimension in CSC-like arrays: for a segment of documents, ``ptr[t]:ptr[t + 1]`` delimits the
postings of dimension ``t`` in ``docs`` (int32 document ids local to the segment, increasing) and ``weights``
(float32, float16 or bfloat16), so a posting costs 8 bytes or less. Documents are stored in segments of at most
``segment_size`` documents (a large collection is added chunk by chunk without rebuilding what is there); searching
visits every segment. The file format of ``save``/``load`` is described in docs/index_format.md.

``optimize()`` (or ``from_documents(..., block_max=True)``) adds the block-max structure of ``block_search.py``, which
``search(mode="safe")`` (exact results, most postings skipped) and ``search(mode="approximate", alpha=...)`` use.
"""
from __future__ import annotations

import numbers
import os
import struct
import threading
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._fake import check_range, fake
from ._files import write_atomic
from .block_search import _SIZES as _BLOCK_MAX_SIZES
from .block_search import BlockMax, build_block_max, validate_block_max, validate_forward, with_maxima
from .compact_terms import check_terms, compact_rows, merged_terms, uses_compact_terms, widened_ptr
from .external_ids import ExternalIds, as_int_ids, as_mask, is_mask
from .sparse import SparseBatch, as_sparse_batch, cast_values, check_lists
from .term_lists import DEFAULT_ALPHA as _LISTS_ALPHA
from .term_lists import DEFAULT_QUERY_CUT as _LISTS_QUERY_CUT
from .term_lists import FIELDS as _LIST_FIELDS
from .term_lists import MAX_ALPHA as _LISTS_MAX_ALPHA
from .term_lists import build_term_lists, check_spec, from_saved, validate_term_lists

_ops = torch.ops.sparse_retrieval

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
_MAGIC = b"SRSPIDX\x00"
# 2 adds named extra arrays (the block-max structure); 3 has superblocks in the block-max structure (the layout is
# that of 2); 4 indexes offsets by the terms held (compact_terms.py: extra arrays "terms" and "block_max.terms"),
# written only for such indexes, so that files of other indexes stay readable by version 3 readers. Files of
# versions 1 and 2 still load (a version 2 block-max structure gets superblock maxima rebuilt from its forward
# index; older files over a dim above COMPACT_DIM get their offsets re-indexed by the terms held). 5: an index
# without postings (optimize(keep_postings=False)): the segments hold the documents from extra array
# "postings_from" on (the tail); written only for such indexes. 6: term lists whose entries are steps
# ("term_lists.ent_steps"; before, 16-bit group numbers "term_lists.ent_groups", converted when read); written only
# for indexes with term lists.
_VERSION = 6
_HEADERS = {1: struct.Struct("<8sIIQQQQ"),  # magic, version, dtype code, dim, ndocs, nsegments, segment_size
            2: struct.Struct("<8sIIQQQQQ"),  # ... and the number of extra arrays
            3: struct.Struct("<8sIIQQQQQ"),
            4: struct.Struct("<8sIIQQQQQ"),
            5: struct.Struct("<8sIIQQQQQ"),
            6: struct.Struct("<8sIIQQQQQ")}
_HEADER_SIZE = 64  # header fields, table crc32, header crc32, zero padding
_ENTRY = struct.Struct("<QQQQQIII12x")  # ndocs, nnz, offsets of ptr/docs/weights, crc32 of ptr/docs/weights
_EXTRA = struct.Struct("<32sIQQI8x")  # name, dtype code, offset, count, crc32
_EXTRA_DTYPES = {0: torch.int64, 1: torch.int32, 2: torch.int16, 3: torch.uint8, 4: torch.float32, 5: torch.float16,
                 6: torch.bfloat16}
_EXTRA_CODES = {v: k for k, v in _EXTRA_DTYPES.items()}
_MODES = ("exact", "safe", "approximate")
# A filtered search scores the allowed documents alone when their postings are fewer than this share of those of the
# query terms (measured: docs/benchmarks.md, "Search filters and deletes").
_SCAN_SHARE = 1.0
_BLOCK_MAX_FIELDS = tuple(f for f in BlockMax.__dataclass_fields__
                          if f not in _BLOCK_MAX_SIZES and f not in ("terms", "lists", "maxima"))
_BLOCK_MAX_FIELDS_V2 = ("fwd_ptr", "fwd_terms", "fwd_weights", "doc_ids", "scale", "bm_dense_row", "bm_dense",
                        "bm_ptr", "bm_blocks", "bm_values")
_ALIGN = 64


@dataclass
class _Segment:
    ptr: torch.Tensor      # int64 (dim + 1,), or (len(terms) + 1,) over compact terms
    docs: torch.Tensor     # int32 (nnz,), local document ids
    weights: torch.Tensor  # (nnz,)
    ndocs: int
    # Over a huge dim (compact_terms.py): the sorted dimensions of the index's documents, shared by all its
    # segments, and ptr indexed by position in it; None: by dimension.
    terms: torch.Tensor | None = None

    def to(self, device) -> "_Segment":
        terms = None if self.terms is None else self.terms.to(device)
        return _Segment(self.ptr.to(device), self.docs.to(device), self.weights.to(device), self.ndocs, terms)

    def widened(self, terms: torch.Tensor) -> "_Segment":
        """The same postings indexed by ``terms``, a superset of this segment's terms."""
        if self.terms.numel() == terms.numel():
            return self
        terms = terms.to(self.ptr.device)
        return _Segment(widened_ptr(self.ptr, self.terms, terms), self.docs, self.weights, self.ndocs, terms)

    @property
    def nbytes(self) -> int:
        """Bytes of the postings and offsets (the term list is shared by the index's segments)."""
        return sum(t.numel() * t.element_size() for t in (self.ptr, self.docs, self.weights))


class SparseIndex:
    """Exact top-k retrieval by dot product over sparse documents (CPU, or CUDA after ``.to("cuda")``).

    ``SparseIndex(dim)`` is empty; ``from_documents(docs)`` builds one; ``add(docs)`` appends documents, their ids
    continuing from ``len(index)``. Any method may be called from several threads at once: searches run in parallel;
    ``add`` and ``optimize`` run one at a time and publish their result whole, so a concurrent search or ``save``
    sees the index either before or after them, never half-way.

    Search modes: ``"exact"`` reads every posting of every query term; ``"safe"`` returns the same results (scores
    bit for bit) reading far fewer, and ``"approximate"`` stops earlier (``alpha``), both through the block-max
    structure that ``optimize()`` builds. Documents added after ``optimize()`` sit in an exhaustive tail that
    safe and approximate searches scan in full and merge; call ``optimize()`` again to fold them in.

    Memory: 8 bytes a posting with float32 weights, 6 with 16-bit ones, plus offsets per dimension and segment (8
    bytes each); over more than 2^20 dimensions the offsets cover only the dimensions the documents hold
    (``compact_terms.py``), so a huge ``dim`` with few documents stays small.
    """

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32, *, segment_size: int = 1 << 20,
                 device: torch.device | str = "cpu"):
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or not 1 <= dim < 2**62:
            raise ValueError(f"dim: expected an int in [1, 2^62), got {dim!r}")
        dim = int(dim)
        if dtype not in _DTYPE_CODES:
            raise TypeError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
        if isinstance(segment_size, bool) or not isinstance(segment_size, int) or not 1 <= segment_size < 2**31:
            raise ValueError(f"segment_size: expected an int in [1, 2^31), got {segment_size!r}")
        self._dim = dim
        self._dtype = dtype
        self.segment_size = segment_size
        self._device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0", to compare with queries
        self._segments: list[_Segment] = []  # replaced, never changed in place, by writers
        self._block_max: BlockMax | None = None  # over documents [0, _block_max.ndocs)
        self._tail: SparseIndex | None = None  # documents added after optimize(), searched exhaustively
        self._deleted: torch.Tensor | None = None  # bool per document (CPU): tombstones of delete()
        self._ids: ExternalIds | None = None  # user ids, when documents were added with ids
        # False after optimize(keep_postings=False): no segments; documents [0, _block_max.ndocs) live in the
        # forward index alone, later ones in the tail.
        self._postings = True
        self._writing = threading.Lock()  # held by add/optimize from start to end
        self._publish = threading.Lock()  # held while the fields above are read or replaced together
        self._mapped: tuple | None = None  # (fd, size, mtime) of the file that load(mmap=True) mapped

    def _state(self) -> tuple[list[_Segment], BlockMax | None, SparseIndex | None, torch.Tensor | None,
                              ExternalIds | None, bool]:
        """A consistent view (segments, block maxima, tail, tombstones, user ids, postings kept) for a reader."""
        with self._publish:
            return self._segments, self._block_max, self._tail, self._deleted, self._ids, self._postings

    def _watch_file(self, fd: int, path: Path, size: int | None = None, mtime: int | None = None) -> None:
        """Remembers the size and time (default: now) of the open file ``fd`` that this index's arrays map (closed
        with the index)."""
        st = os.fstat(fd)
        self._mapped = (fd, st.st_size if size is None else size, st.st_mtime_ns if mtime is None else mtime, path)
        weakref.finalize(self, os.close, fd)

    def _check_mapped_file(self) -> None:
        """Arrays mapped from a file read whatever the file holds now: refuse to search once it changed in place
        (a save to the same path replaces the file and leaves the mapped one alone). The file's size and
        modification time tell a change, so an edit within the file system's time step (a few ms) of the load
        that keeps the size, or one racing this check, is not seen: the kernels still bound every read, and
        truncation then ends the process with SIGBUS, as for any memory map."""
        if self._mapped is not None:
            fd, size, mtime, path = self._mapped
            st = os.fstat(fd)
            if (st.st_size, st.st_mtime_ns) != (size, mtime):
                raise ValueError(f"{path}: the index file changed on disk after load(mmap=True) mapped it; load it "
                                 f"again (or load with mmap=False to read it into memory)")

    # ---- building ------------------------------------------------------------------------------------------------
    @classmethod
    def from_documents(cls, docs, dtype: torch.dtype | None = None, *, ids=None, segment_size: int = 1 << 20,
                       block_max: bool = False, block_size: int = 8, superblock: int | str = "auto",
                       reorder: bool = True, order=None, term_lists: bool | dict = False,
                       block_maxima: bool = True, keep_postings: bool = True,
                       progress: bool = True) -> "SparseIndex":
        """An index over ``docs`` (a SparseBatch or any format ``search`` takes), weights stored as ``dtype``
        (default: docs' dtype). Document ids are 0 .. len(docs) - 1, or ``ids`` (see ``add``). ``block_max=True``
        also builds the structure of safe and approximate search, ``term_lists`` that of approximate search at
        scale; ``block_maxima=False`` and ``keep_postings=False`` leave structures out (see ``optimize``)."""
        docs = as_sparse_batch(docs, "docs")
        for name, value in (("term_lists", term_lists), ("keep_postings", not keep_postings),
                            ("block_maxima", not block_maxima)):
            if value and not block_max:
                raise ValueError(f"{name}: needs the block-max structure; pass block_max=True as well")
        index = cls(docs.dim, dtype or docs.dtype, segment_size=segment_size, device=docs.device)
        index.add(docs, ids=ids, progress=progress)
        if block_max:
            index._optimize(docs, block_size, superblock, reorder, order, term_lists, block_maxima, keep_postings,
                            progress)
        return index

    def optimize(self, *, block_size: int = 8, superblock: int | str = "auto", reorder: bool = True, order=None,
                 term_lists: bool | dict = False, block_maxima: bool = True, keep_postings: bool = True,
                 progress: bool = True) -> None:
        """Builds (or rebuilds, folding in documents added since) the block-max structure over all documents:
        documents clustered so that similar ones are neighbours (``reorder``; ids stay as they are), cut into
        blocks of ``block_size`` documents and superblocks of ``superblock`` blocks with 8-bit per-term maxima,
        and a forward index. ``order`` (a permutation of the document positions 0 .. len - 1: your own reordering,
        e.g. recursive graph bisection, or ``index.block_max.doc_ids`` of an earlier build) skips the clustering.
        ``superblock`` > 1 bounds superblocks first and blocks only inside the promising ones (DSP): faster from a
        few million documents on, slower below; ``"auto"`` picks 2 or 1 by the number of documents
        (``block_search.AUTO_SUPERBLOCK_DOCS``). Needs finite, non-negative document weights; memory: about the
        size of the postings again.

        ``term_lists=True`` (or a dict of ``list_len``, ``group``, ``summary_energy``, ``doc_cut``; see
        ``term_lists.py``) also builds per-term lists of clustered documents with summaries, after Seismic, which
        ``search(mode="approximate")`` then uses instead of the block maxima: the fast approximate search on
        large collections (2M documents, 1 thread: 2.1-2.4x Seismic's QPS at recall 0.95, 0.97 and 0.99;
        8.8M: recall 0.979 at 0.32 ms p50 per query). Documents per term default
        to 2,000 up to 2M documents and grow with the collection to the power 0.8 beyond
        (``term_lists.auto_list_len``). Memory: 0.87 GB at 2M documents (2,000 per term, dim 30,522), 2.7 GB
        at 8.8M (6,500 per term); building: 2 minutes at 2M documents, about 10 at 8.8M (2 threads).

        ``keep_postings=False`` then drops the exhaustive postings (the index's first copy of the documents; 6-8
        bytes a posting): the forward index of the block-max structure becomes the only one. Safe and approximate
        search are unchanged; exact search and the few queries that safe search hands to it (fewer than k
        documents with a positive score) score every document from the forward index instead: the same results,
        slower (a scan of all postings per query), and a query with more than 255 terms or a non-finite weight
        raises ValueError. Documents added later sit in the exhaustive tail as usual; ``optimize()`` (which keeps
        the postings by default) rebuilds them. ``block_maxima=False`` (with term lists) also leaves out the block
        maxima: an index for approximate search alone (the default mode then), as Seismic's, which refuses
        ``mode="safe"``; exact search still works as above. Memory at 2M documents with term lists: 2.75 GB with
        everything, 1.96 GB without postings, 1.64 GB without postings and maxima (Seismic's: 1.21 GB)."""
        self._optimize(None, block_size, superblock, reorder, order, term_lists, block_maxima, keep_postings,
                       progress)

    def _optimize(self, docs: SparseBatch | None, block_size: int, superblock: int, reorder: bool, order,
                  term_lists: bool | dict, block_maxima: bool, keep_postings: bool, progress: bool) -> None:
        """optimize() over ``docs`` (all of the index's documents, when the caller has them: no rebuild from the
        postings)."""
        if self._device.type != "cpu":
            raise ValueError(f"optimize: block-max search runs on the CPU; the index is on {self._device}")
        lists_spec = _term_lists_spec(term_lists)  # checked before the long build, not after
        for name, value in (("block_maxima", block_maxima), ("keep_postings", keep_postings)):
            if not isinstance(value, bool):
                raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
        if not block_maxima and lists_spec is None:
            raise ValueError("block_maxima=False: needs term lists (term_lists=True), which approximate search then "
                             "uses; without either, only exact search would be left")
        with self._writing:
            docs = self._documents(0, len(self)) if docs is None else docs
            block_max = build_block_max(docs, self._dtype, block_size=block_size, superblock=superblock,
                                        reorder=reorder, order=order, maxima=block_maxima, progress=progress)
            if lists_spec is not None:
                block_max.lists = build_term_lists(block_max, **lists_spec)
            segments = []
            if keep_postings:
                segments = self._segments if self._postings else self._with_postings(docs, progress)._segments
            with self._publish:
                self._block_max, self._tail, self._segments, self._postings = block_max, None, segments, keep_postings

    def _with_postings(self, docs: SparseBatch, progress: bool) -> "SparseIndex":
        """A plain index (postings only) over ``docs``, with this one's settings."""
        fresh = SparseIndex(self._dim, self._dtype, segment_size=self.segment_size, device=self._device)
        fresh.add(docs, progress=progress)
        return fresh

    def add(self, docs, *, ids=None, progress: bool = True) -> None:
        """Appends ``docs`` (a SparseBatch or any format ``search`` takes). Without ``ids`` they get the positional
        ids ``len(self)`` .. ``len(self) + len(docs) - 1``. With ``ids`` (one per document: non-negative ints, or
        strings; unique) the index keys its documents by them from then on: ``search`` returns them (an int64
        tensor, padding -1; or for strings a numpy object array, padding None), ``delete`` and ``filter`` take
        them, and every later ``add`` must pass ids of the same kind. They are saved with the index. Equal scores
        are ranked by insertion order (the document added first wins), which for positional ids is the lower id."""
        docs = as_sparse_batch(docs, "docs")
        if docs.dim != self._dim:
            raise ValueError(f"docs: dim {docs.dim} differs from the index's dim {self._dim}")
        from tqdm.auto import tqdm

        n = len(docs)
        start = 0
        with self._writing, tqdm(total=n, desc="indexing", unit="doc",
                                 disable=not progress or n <= self.segment_size) as bar:
            user_ids = self._ids
            if user_ids is not None and user_ids.auto:  # positional ids kept through compact(): the index assigns
                if ids is not None:
                    raise ValueError("ids: this index assigns its own ids (its positional ids, kept by compact())")
                ids = torch.arange(user_ids.next_id, user_ids.next_id + n)
            if ids is None and user_ids is not None:
                raise ValueError("ids: this index keys its documents by user ids; pass one per document")
            if ids is not None and user_ids is None and len(self) > 0:
                raise ValueError("ids: this index already holds documents without ids (positional ids)")
            if ids is not None and user_ids is not None and ExternalIds.kind_of(ids) != user_ids.kind:
                raise TypeError(f"ids: this index's ids are {user_ids.kind}s")
            if ids is not None:  # checked before any work: a bad id raises with nothing changed
                user_ids = (user_ids or ExternalIds(ExternalIds.kind_of(ids))).extended(ids, n)
            segments, tail = list(self._segments), self._tail
            if self._postings:
                terms = self._held_terms(segments)
                if terms is not None and n:  # one list for all segments: a query is mapped once
                    terms = merged_terms(terms, docs.indices)
                    segments = [s.widened(terms) for s in segments]
                while start < n:
                    last = segments[-1] if segments else None
                    room = self.segment_size - last.ndocs if last is not None else 0
                    take = min(n - start, room if room > 0 else self.segment_size)
                    seg = self._build(docs[start:start + take], terms)
                    if room > 0:
                        segments[-1] = _merge(last, seg)
                    else:
                        segments.append(seg)
                    start += take
                    bar.update(take)
            if self._block_max is not None and n:
                tail = (tail.to(self._device) if tail is not None else  # a copy: readers may hold the old one
                        SparseIndex(self._dim, self._dtype, segment_size=self.segment_size, device=self._device))
                tail.add(docs, progress=False)
            bar.update(n - start)  # without postings the tail was all the work
            deleted = self._deleted
            if deleted is not None and n:
                deleted = torch.cat([deleted, torch.zeros(n, dtype=torch.bool)])
            with self._publish:
                self._segments, self._tail, self._deleted, self._ids = segments, tail, deleted, user_ids

    def delete(self, ids) -> None:
        """Marks documents deleted (ids: one, or a sequence / tensor / array of them; user ids when the index has
        them): no search mode returns them again; ids are not reused. Tombstones are saved with the index; the
        postings stay until the index is rebuilt. Deleting twice is allowed; an unknown id raises ValueError."""
        with self._writing:  # ids resolved under the lock: compact() may renumber positions
            n = len(self)
            ids = self._ids.positions(ids, "ids") if self._ids is not None else as_int_ids(ids, "ids", below=n)
            deleted = torch.zeros(n, dtype=torch.bool) if self._deleted is None else self._deleted.clone()
            deleted[ids.long().cpu()] = True
            with self._publish:
                self._deleted = deleted

    def compact(self, *, progress: bool = True) -> None:
        """Drops the deleted documents' postings (and rebuilds the block-max structure, if any, over the rest).
        Ids do not change: an index without user ids keeps its positional ids as ids the index assigns itself
        (new documents continue from the largest id ever given). The deleted documents' ids are forgotten: before
        ``compact()`` filters and ``delete`` accept them (and ignore them), after it they raise "unknown ids" like
        any id the index never had; an allow-list kept elsewhere should drop them."""
        with self._writing:
            segments, block_max, _, deleted, user_ids, postings = self._state()
            if deleted is None or not bool(deleted.any()):
                return
            keep = (~deleted).nonzero().flatten()
            docs = self._documents(0, len(deleted))[keep]
            if user_ids is None:
                user_ids = ExternalIds("int", auto=True).extended(torch.arange(len(deleted)), len(deleted))
            user_ids = user_ids.subset(keep)
            segments = self._with_postings(docs, progress)._segments if postings else []
            if block_max is not None:
                lists = block_max.lists
                block_max = build_block_max(docs, self._dtype, block_size=block_max.block_size,
                                            superblock=block_max.superblock, maxima=block_max.maxima,
                                            progress=progress)
                if lists is not None:
                    block_max.lists = build_term_lists(block_max, list_len=lists.list_len, group=lists.group,
                                                       summary_energy=lists.summary_energy, doc_cut=lists.doc_cut)
            with self._publish:
                self._segments, self._block_max, self._tail = segments, block_max, None
                self._deleted, self._ids = None, user_ids
                self._mapped = None  # nothing reads a loaded file any more

    @property
    def ndeleted(self) -> int:
        """Documents marked deleted (they still count in ``len``: ids are never reused)."""
        deleted = self._deleted
        return 0 if deleted is None else int(deleted.sum())

    def _held_terms(self, segments: list[_Segment]) -> torch.Tensor | None:
        """The compact term list the segments share (CPU), or None when this index is indexed by dimension."""
        if not uses_compact_terms(self._dim):
            return None
        return segments[0].terms.cpu() if segments else torch.empty(0, dtype=torch.int64)

    def _build(self, docs: SparseBatch, terms: torch.Tensor | None) -> _Segment:
        """Postings of ``docs`` over ``terms`` (see _held_terms; they must include every dimension of docs). Built
        on the CPU (a counting sort), then moved to the index's device."""
        cpu, dim = docs.to("cpu"), self._dim
        if terms is not None:
            cpu, dim = compact_rows(cpu, terms), terms.numel()
        ptr, ids, weights = _ops.build_postings(cpu.indptr, cpu.indices,
                                                cast_values(cpu.values.detach(), self._dtype, "docs values"), dim)
        return _Segment(ptr, ids, weights, len(docs), terms).to(self._device)

    def _segment_rows(self, queries: SparseBatch, segments: list[_Segment]) -> SparseBatch:
        """``queries`` in the segments' term numbering."""
        terms = segments[0].terms if segments else None
        return queries if terms is None else compact_rows(queries, terms)

    def _documents(self, lo: int, hi: int) -> SparseBatch:
        """Documents [lo, hi) as a CPU SparseBatch (each row's terms ascending): from the postings, or without
        them from the forward index and the tail."""
        segments, block_max, tail, _, _, postings = self._state()
        if postings:
            return _posting_documents(segments, lo, hi, self._dim, self._dtype)
        split = block_max.ndocs
        parts = [block_max.documents(lo, min(hi, split), self._dim)] if lo < split or tail is None else []
        if hi > split:
            parts.append(tail._documents(max(lo, split) - split, hi - split))
        return SparseBatch.cat(parts) if len(parts) > 1 else parts[0]

    # ---- facts -----------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        segments, block_max, tail, _, _, postings = self._state()
        return _ndocs(segments, block_max, tail, postings)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def nnz(self) -> int:
        """Number of postings (of the forward index, for documents whose postings were dropped)."""
        segments, block_max, tail, _, _, postings = self._state()
        if postings:
            return sum(s.docs.numel() for s in segments)
        return block_max.fwd_terms.numel() + (tail.nnz if tail is not None else 0)

    @property
    def nbytes(self) -> int:
        """Bytes held by the index's tensors."""
        segments = self._segments
        terms = segments[0].terms if segments else None
        own = sum(s.nbytes for s in segments) + (0 if terms is None else 8 * terms.numel())
        return own + (self._block_max.nbytes if self._block_max else 0) + (self._tail.nbytes if self._tail else 0)

    @property
    def block_max(self) -> BlockMax | None:
        """The block-max structure of safe and approximate search (None before ``optimize``)."""
        return self._block_max

    def __repr__(self) -> str:
        return (f"SparseIndex(docs={len(self)}, dim={self._dim}, postings={self.nnz}, weights={self._dtype}, "
                f"segments={len(self._segments)}{'' if self._postings else ' (postings dropped)'}, "
                f"device={self._device}, block_max="
                + (f"{self._block_max.ndocs} docs in blocks of {self._block_max.block_size})" if self._block_max
                   else "None)"))

    def to(self, device) -> "SparseIndex":
        """A copy of the index on ``device`` (searches then run there)."""
        out = SparseIndex(self._dim, self._dtype, segment_size=self.segment_size, device=device)
        segments, block_max, tail, deleted, user_ids, postings = self._state()
        if not postings and out._device.type != "cpu":
            raise ValueError(f"to: an index without postings (keep_postings=False) searches on the CPU only; "
                             f"rebuild them with optimize() first")
        out._postings = postings
        out._segments = [s.to(out._device) for s in segments]
        out._block_max = block_max  # CPU only: safe/approximate search refuse other devices
        out._tail = tail.to(device) if tail is not None else None
        out._deleted = deleted
        out._ids = user_ids
        if self._mapped is not None and out._device.type == "cpu":  # still reading the mapped file, as it was
            fd, size, mtime, path = self._mapped
            out._watch_file(os.dup(fd), path, size, mtime)
        return out

    # ---- search ----------------------------------------------------------------------------------------------------
    def search(self, queries, k: int, threads: int | None = None, *, mode: str | None = None,
               alpha: float | None = None, query_cut: int | None = None,
               filter=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k documents of each query by dot product: (scores float32 (nq, k), ids int64 (nq, k)).

        ``queries``: a SparseBatch, a torch sparse (CSR/COO) or dense tensor (one vector or rows), a numpy array
        or a scipy.sparse matrix (see ``sparse.as_sparse_batch``), of the index's dim.

        Scores descending, ties to the lower document id; with fewer than k documents the rest is score -inf and
        id -1. ``threads`` (CPU) defaults to ``torch.get_num_threads()``. Definition: ``reference.sparse_search``.

        ``mode``: ``"exact"`` (exhaustive), ``"safe"`` (the same results through block-max pruning) or
        ``"approximate"``. Approximate search over the block maxima stops once the k-th score beats ``alpha``
        times the best bound left (``alpha`` in (0, 1], default 0.9; exact at 1; ``query_cut``, default all terms,
        bounds blocks with only that many query terms, the heaviest). With term lists (``optimize(term_lists=
        True)``) it scores the groups listed under the query's ``query_cut`` heaviest terms (default 8), best
        summary first, until the k-th score beats ``alpha`` times the best summary score left (``alpha`` in (0,
        16], default 1.1: summaries miss terms, so alpha above 1 buys recall). Recall only grows with alpha.
        Default: ``"safe"`` once ``optimize()`` has run on a CPU index (``"approximate"`` if it left out the block
        maxima), else ``"exact"``. Safe and approximate search run on the CPU, one thread per query.

        ``filter``: the documents allowed as results, as a collection of ids (tensor, array, list, set, range) or, for
        an index with positional ids, a bool mask over them (tensor, array or list of bools; uint8 is refused as
        ambiguous). After ``compact()`` the index keeps its ids as user ids: filters then take ids, not masks. The
        kernels skip the others while choosing, so k allowed documents come back whenever k exist (then padding).
        Deleted documents are never returned. CPU only. Once ``optimize()`` has run, a filter whose allowed documents
        hold fewer postings than the query terms' posting lists is answered in every mode by scoring the allowed
        documents alone from the forward index: the exact results (scores bit for bit), in time proportional to the
        allowed documents (203k passages: 18x faster than unfiltered exhaustive search at 0.1% allowed, 1.4x at 1%).
        """
        queries = as_sparse_batch(queries, "queries")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k < 2**31:
            raise ValueError(f"k: expected an int in [0, 2^31), got {k!r}")
        k = int(k)
        if threads is None:
            threads = torch.get_num_threads()
        if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
            raise ValueError(f"threads: expected an int >= 1, got {threads!r}")
        threads = min(int(threads), 1 << 16)
        segments, block_max, tail, deleted, user_ids, postings = self._state()
        forward = None if postings else (block_max, tail)  # what exhaustive search reads without postings
        if mode is None:
            mode = "exact" if block_max is None or self._device.type != "cpu" else \
                "safe" if block_max.maxima else "approximate"
        if mode not in _MODES:
            raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
        if mode == "safe" and block_max is not None and not block_max.maxima:
            raise ValueError("mode='safe': this index was optimized with block_maxima=False (approximate search "
                             "only); use mode='approximate' or 'exact', or optimize() again")
        for name, value in (("alpha", alpha), ("query_cut", query_cut)):
            if value is not None and mode != "approximate":
                raise ValueError(f"{name}: only for mode='approximate' (mode is {mode!r})")
        if query_cut is not None and (isinstance(query_cut, bool) or not isinstance(query_cut, numbers.Integral)
                                      or not 1 <= query_cut < 2**31):
            raise ValueError(f"query_cut: expected an int in [1, 2^31), got {query_cut!r}")
        lists = mode == "approximate" and block_max is not None and block_max.lists is not None
        if mode == "approximate":
            high = _LISTS_MAX_ALPHA if lists else 1
            alpha = (_LISTS_ALPHA if lists else 0.9) if alpha is None else alpha
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= high:
                raise ValueError(f"alpha: expected a number in (0, {high:g}], got {alpha!r}")
            if lists and query_cut is None:
                query_cut = _LISTS_QUERY_CUT
        self._check_mapped_file()
        if queries.device != self._device:
            raise ValueError(f"queries: on {queries.device}, the index is on {self._device}")
        if queries.nnz and int(queries.indices.max()) >= self._dim:
            raise ValueError(f"queries: dimension {int(queries.indices.max())} is beyond the index's dim "
                             f"{self._dim}")
        n = _ndocs(segments, block_max, tail, postings)
        if filter is not None and user_ids is not None:
            if is_mask(filter):
                raise ValueError("filter: this index has user ids (given to add, or kept by compact()); pass the "
                                 "allowed ids, not a mask")
            filter = user_ids.positions(filter, "filter")
        allowed = _allowed(filter, deleted, n)
        if allowed is not None and self._device.type != "cpu":
            raise ValueError(f"filter: search filters (and deletes) run on the CPU; the index is on {self._device}")
        scan = self._scan_positions(queries, segments, block_max, allowed, postings)
        if mode == "exact" and scan is None:
            return _to_user_ids(user_ids, *self._exact(queries, k, threads, segments, allowed, forward))
        if block_max is None:
            raise ValueError(f"mode={mode!r}: needs the block-max structure; call index.optimize() first (or build "
                             f"with SparseIndex.from_documents(docs, block_max=True))")
        if self._device.type != "cpu":
            raise ValueError(f"mode={mode!r}: block-max search runs on the CPU; the index is on {self._device}")
        scores, ids, complete, _ = block_max.search(
            queries, k, float(alpha) if mode == "approximate" else 1.0, threads, int(query_cut or 0),
            None if allowed is None or scan is not None else allowed[:block_max.ndocs], scan,
            lists=lists and scan is None)
        scores, ids = _with_tail(scores, ids, queries, k, threads, tail, block_max.ndocs, allowed)
        if not bool(complete.all()):  # fewer than k positive scores: exhaustive search defines the result
            redo = (~complete).nonzero().flatten()
            scores[redo], ids[redo] = self._exact(queries[redo], k, threads, segments, allowed, forward)
        return _to_user_ids(user_ids, scores, ids)

    def _scan_positions(self, queries: SparseBatch, segments: list[_Segment], block_max: BlockMax | None,
                        allowed: torch.Tensor | None, postings: bool) -> torch.Tensor | None:
        """The stored positions of the allowed documents when scoring just those from the forward index is cheaper
        than searching (the same results in every mode, scores bit for bit), else None. Cost model: the allowed
        documents' postings against the postings of the query terms that exhaustive search reads (counted from
        the forward index without postings); pruned search gains little under a selective filter, since its
        bounds ignore the filter."""
        if block_max is None or allowed is None or self._device.type != "cpu" or not len(queries) \
                or not block_max.ndocs:
            return None
        head = allowed[:block_max.ndocs]
        nallowed = int(head.sum())
        if postings:
            terms = self._segment_rows(queries, segments).indices.long()
            read = sum(int((s.ptr[terms + 1] - s.ptr[terms]).sum()) for s in segments) / len(queries)
        else:
            rows = queries if block_max.terms is None else compact_rows(queries, block_max.terms)
            read = int(block_max.term_counts[rows.indices.long()].sum()) / len(queries)
        if nallowed * block_max.fwd_terms.numel() / block_max.ndocs >= _SCAN_SHARE * read:
            return None
        return block_max.positions_of(head)

    def _exact(self, queries: SparseBatch, k: int, threads: int, segments: list[_Segment],
               allowed: torch.Tensor | None = None, forward: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exhaustive search over the postings of ``segments``, or, without postings, over ``forward`` = (block
        maxima, tail): every document of the forward index scored, then the tail."""
        if forward is not None:
            block_max, tail = forward
            scores, ids = block_max.scan(queries, k, threads, None if allowed is None else allowed[:block_max.ndocs])
            return _with_tail(scores, ids, queries, k, threads, tail, block_max.ndocs, allowed)
        segs = segments or [self._build(SparseBatch.from_lists([], self._dim, dtype=self._dtype),
                                        self._held_terms(segments))]
        queries = self._segment_rows(queries, segs)
        return _ops.sparse_search(queries.indptr, queries.indices, queries.values.detach(),
                                  [s.ptr for s in segs], [s.docs for s in segs], [s.weights for s in segs],
                                  [s.ndocs for s in segs], k, threads, allowed)

    # ---- files -----------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Writes the index (with its block-max structure, if any) to ``path`` atomically: a temporary file in the
        same folder, fsync, then rename."""
        path = Path(path)
        segments, block_max, tail, deleted, user_ids, postings = self._state()
        total = _ndocs(segments, block_max, tail, postings)
        if not postings:  # the tail's postings are the file's segments
            segments = tail._state()[0] if tail is not None else []
        segs = [s.to("cpu") for s in segments]
        extras = _extras(block_max)
        if not postings:
            extras["postings_from"] = torch.tensor([block_max.ndocs])
        terms = self._held_terms(segs)
        if terms is not None:
            extras["terms"] = terms
        if deleted is not None:
            extras["deleted"] = deleted.to(torch.uint8)
        if user_ids is not None:
            extras.update(user_ids.arrays())
        sections, entries, offset = [], [], _HEADER_SIZE + _ENTRY.size * len(segs) + _EXTRA.size * len(extras)

        def place(a: np.ndarray) -> int:
            nonlocal offset
            offset = -(-offset // _ALIGN) * _ALIGN
            sections.append((offset, a))
            at, offset = offset, offset + a.nbytes
            return at

        for s in segs:
            arrays = [_as_numpy(s.ptr), _as_numpy(s.docs), _as_numpy(s.weights)]
            offsets = [place(a) for a in arrays]
            entries.append(_ENTRY.pack(s.ndocs, s.docs.numel(), *offsets, *(zlib.crc32(a) for a in arrays)))
        for name, t in extras.items():
            a = _as_numpy(t)
            entries.append(_EXTRA.pack(name.encode(), _EXTRA_CODES[t.dtype], place(a), t.numel(), zlib.crc32(a)))
        table = b"".join(entries)
        version = min(_VERSION, 6 if block_max is not None and block_max.lists is not None else
                      5 if not postings or (block_max is not None and not block_max.maxima) else
                      4 if terms is not None or "block_max.terms" in extras else 3)
        head = _HEADERS[version].pack(_MAGIC, version, _DTYPE_CODES[self._dtype], self._dim, total, len(segs),
                                       self.segment_size, len(extras))
        head += struct.pack("<I", zlib.crc32(table))
        head += struct.pack("<I", zlib.crc32(head))
        head = head.ljust(_HEADER_SIZE, b"\0")

        def write(f):
            f.write(head + table)
            for off, a in sections:
                f.seek(off)
                f.write(memoryview(a).cast("B"))

        write_atomic(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True) -> "SparseIndex":
        """Reads an index written by ``save`` (format versions 1 to 6); with ``mmap`` its arrays map the file
        instead of being read. Checksums and structure are verified; a truncated or corrupted file raises
        ``ValueError``."""
        path = Path(path)
        with open(path, "rb") as f:  # one open file: the arrays map the inode whose header was checked
            index = cls._load(path, f, mmap)
            if mmap:
                index._watch_file(os.dup(f.fileno()), path)
        return index

    @classmethod
    def _load(cls, path: Path, f, mmap: bool) -> "SparseIndex":
        size = os.fstat(f.fileno()).st_size
        head = f.read(_HEADER_SIZE)
        if len(head) < _HEADER_SIZE or head[:8] != _MAGIC:
            raise ValueError(f"{path}: not a sparse_retrieval index file (bad magic or shorter than a header)")
        version = struct.unpack_from("<I", head, 8)[0]
        if version not in _HEADERS:
            raise ValueError(f"{path}: format version {version}, this library reads versions 1 to {_VERSION}")
        fmt = _HEADERS[version]
        magic, version, code, dim, ndocs, nseg, segment_size, *rest = fmt.unpack_from(head)
        nextra = rest[0] if rest else 0
        table_crc, head_crc = struct.unpack_from("<II", head, fmt.size)
        if zlib.crc32(head[:fmt.size + 4]) != head_crc:
            raise ValueError(f"{path}: header checksum mismatch (corrupted file)")
        if code not in _CODE_DTYPES:
            raise ValueError(f"{path}: unknown weight dtype code {code}")
        table_size = _ENTRY.size * nseg + _EXTRA.size * nextra
        if table_size > size:
            raise ValueError(f"{path}: truncated (segment table incomplete)")
        table = f.read(table_size)
        if len(table) != table_size:
            raise ValueError(f"{path}: truncated (segment table incomplete)")
        if zlib.crc32(table) != table_crc:
            raise ValueError(f"{path}: segment table checksum mismatch (corrupted file)")
        dtype = _CODE_DTYPES[code]
        if dim < 1 or not 1 <= segment_size < 2**31:
            raise ValueError(f"{path}: invalid dim {dim} or segment size {segment_size}")
        index = cls(dim, dtype, segment_size=segment_size)

        def array(name: str, off: int, crc: int, count: int, t: torch.dtype) -> torch.Tensor:
            np_dtype = _NP_DTYPES[t]
            if count and off + count * np_dtype.itemsize > size:  # an empty array may sit past the end
                raise ValueError(f"{path}: truncated ({name} ends past the end of the file)")
            a = _read(f, np_dtype, off, count, mmap)
            if zlib.crc32(a) != crc:
                raise ValueError(f"{path}: checksum mismatch in {name} (corrupted file)")
            return torch.from_numpy(a).view(t) if t == torch.bfloat16 else torch.from_numpy(a)

        extras = {}
        for e in range(nextra):
            name, tcode, off, count, crc = _EXTRA.unpack_from(table, _ENTRY.size * nseg + e * _EXTRA.size)
            name = name.rstrip(b"\0").decode("utf-8", "replace")
            if tcode not in _EXTRA_DTYPES:
                raise ValueError(f"{path}: unknown dtype code {tcode} of {name}")
            extras[name] = array(name, off, crc, count, _EXTRA_DTYPES[tcode])
        terms = extras.pop("terms", None)
        if terms is not None:
            check_terms(terms, dim, f"{path}: terms")
        postings_from = extras.pop("postings_from", None)
        if postings_from is not None:
            if version < 5 or postings_from.dtype != torch.int64 or postings_from.numel() != 1 or \
                    not 0 <= int(postings_from[0]) <= ndocs:
                raise ValueError(f"{path}: invalid postings_from")
            postings_from = int(postings_from[0])
        for s in range(nseg):
            seg_docs, nnz, *rest = _ENTRY.unpack_from(table, s * _ENTRY.size)
            if seg_docs > segment_size:
                raise ValueError(f"{path}: segment {s} holds {seg_docs} documents, more than the segment size "
                                 f"{segment_size}")
            nptr = (dim if terms is None else terms.numel()) + 1
            arrays = [array(f"segment {s} {name}", off, crc, count, t) for name, off, crc, count, t in
                      zip(("ptr", "docs", "weights"), rest[:3], rest[3:], (nptr, nnz, nnz),
                          (torch.int64, torch.int32, dtype))]
            seg = _Segment(arrays[0], arrays[1], arrays[2], seg_docs, terms)
            _validate(seg, nptr - 1, f"{path}: segment {s}")
            index._segments.append(seg)
        held = sum(s.ndocs for s in index._segments)
        if held != ndocs - (postings_from or 0):
            raise ValueError(f"{path}: segments hold {held} documents, the header says {ndocs}"
                             + ("" if postings_from is None else f" from document {postings_from} on"))
        # Offsets follow this library's COMPACT_DIM whatever the writer's: per dimension (before version 4, or a
        # writer with a higher threshold) re-indexed by the terms held, and the other way round.
        if uses_compact_terms(dim) and terms is None:
            index._segments = _held_by_all(index._segments)
        elif terms is not None and not uses_compact_terms(dim):
            every = torch.arange(dim)
            index._segments = [_Segment(widened_ptr(s.ptr, terms, every), s.docs, s.weights, s.ndocs)
                               for s in index._segments]
        id_arrays = {name: extras.pop(name) for name in list(extras) if name.startswith("ids.")}
        if id_arrays:
            index._ids = ExternalIds.from_arrays(id_arrays, ndocs, f"{path}: ids")
        deleted = extras.pop("deleted", None)
        if deleted is not None:
            if deleted.numel() != ndocs or bool((deleted > 1).any()):
                raise ValueError(f"{path}: the tombstones do not match the {ndocs} documents")
            index._deleted = deleted.bool()
        tail = None
        if postings_from is not None:
            if not extras:
                raise ValueError(f"{path}: an index without postings lacks its block-max structure")
            tail = SparseIndex(dim, dtype, segment_size=segment_size)
            tail._segments, index._segments, index._postings = index._segments, [], False
        if extras:
            index._load_block_max(extras, version, f"{path}", ndocs, postings_from, tail)
        return index

    def _load_block_max(self, extras: dict[str, torch.Tensor], version: int, where: str, total: int,
                        postings_from: int | None, tail: SparseIndex | None) -> None:
        """The block-max structure (and the tail) of an index of ``total`` documents; without postings the
        structure must cover the documents before ``postings_from`` and ``tail`` holds the others."""
        fields = _BLOCK_MAX_FIELDS if version >= 3 else _BLOCK_MAX_FIELDS_V2
        sizes = (3, 4) if version >= 5 else (3,) if version >= 3 else (2,)
        terms = extras.pop("block_max.terms", None) if version >= 4 else None
        list_meta = extras.pop("term_lists.meta", None)
        list_arrays = {name.split(".", 1)[1]: extras.pop(name) for name in list(extras)
                       if name.startswith("term_lists.")}
        if set(extras) != {f"block_max.{f}" for f in ("meta", *fields)} or \
                extras["block_max.meta"].numel() not in sizes:
            raise ValueError(f"{where}: unexpected extra arrays {sorted(extras)}")
        meta = extras["block_max.meta"].tolist()
        block_size, superblock, ndocs = meta[:3] if version >= 3 else (meta[0], 1, meta[1])
        maxima = len(meta) < 4 or meta[3] != 0
        if not 1 <= block_size <= 1 << 20 or not 1 <= superblock <= 1024 or not 0 <= ndocs <= total or \
                (postings_from is not None and ndocs != postings_from) or meta[3:] not in ([], [0]) or \
                (not maxima and list_meta is None):
            raise ValueError(f"{where}: invalid block-max sizes (block {block_size}, superblock {superblock}, "
                             f"documents {ndocs})")
        arrays = {k.split(".", 1)[1]: v for k, v in extras.items() if k != "block_max.meta"}
        if version < 3:  # the forward index is all that version 2 shares with this structure: maxima rebuilt
            fwd = {f: arrays[f] for f in _BLOCK_MAX_FIELDS_V2[:4]}
            if arrays["fwd_ptr"].numel() != ndocs + 1:
                raise ValueError(f"{where}: block_max: forward index offsets are inconsistent")
            validate_forward(*fwd.values(), self._dim, f"{where}: block_max")
            bm = with_maxima(self._dim, block_size, superblock, *fwd.values())
        else:
            bm = BlockMax(block_size, superblock, ndocs, **arrays, terms=terms, maxima=maxima)
        if bm.fwd_weights.dtype != self._dtype:
            raise ValueError(f"{where}: block-max weights are {bm.fwd_weights.dtype}, the index's {self._dtype}")
        validate_block_max(bm, self._dim, f"{where}: block_max")
        if list_meta is not None or list_arrays:
            if list_meta is None:
                raise ValueError(f"{where}: term lists without their parameters")
            bm.lists = from_saved(list_meta, list_arrays, where)
            validate_term_lists(bm.lists, bm, where)
        self._block_max = bm
        if tail is not None:
            self._tail = tail if len(tail) else None
        elif ndocs < total:
            self._tail = SparseIndex.from_documents(self._documents(ndocs, total), self._dtype,
                                                    segment_size=self.segment_size, progress=False)


# ---- helpers -----------------------------------------------------------------------------------------------------


def _to_user_ids(user_ids: ExternalIds | None, scores: torch.Tensor, pos: torch.Tensor):
    return (scores, pos) if user_ids is None else (scores, user_ids.lookup(pos))


def _allowed(filter, deleted: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """The bool mask of documents a search may return: ``filter`` (a mask or ids) without the deleted ones."""
    if filter is None:
        return None if deleted is None or not bool(deleted.any()) else ~deleted
    if is_mask(filter):
        mask = as_mask(filter, n, "filter").clone()
    else:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[as_int_ids(filter, "filter", below=n)] = True
    return mask if deleted is None else mask & ~deleted


def _extras(bm: BlockMax | None) -> dict[str, torch.Tensor]:
    """Named arrays saved beside the segments: the block-max structure (the tail is rebuilt on load)."""
    if bm is None:
        return {}
    meta = [bm.block_size, bm.superblock, bm.ndocs] + ([] if bm.maxima else [0])  # 4th: maxima (version 5)
    out = {"block_max.meta": torch.tensor(meta, dtype=torch.int64)}
    out.update({f"block_max.{k}": v.cpu() for k, v in bm.tensors().items()})
    if bm.terms is not None:
        out["block_max.terms"] = bm.terms.cpu()
    if bm.lists is not None:
        out["term_lists.meta"] = bm.lists.meta()
        out.update({f"term_lists.{name}": t for name, t in zip(_LIST_FIELDS, bm.lists.tensors())})
    return out


def _term_lists_spec(spec: bool | dict) -> dict | None:
    """build_term_lists' parameters for ``optimize(term_lists=spec)``: None (False), the defaults (True) or the
    dict given, checked."""
    if spec is False or spec is None:
        return None
    if spec is True:
        return {}
    if not isinstance(spec, dict):
        raise TypeError(f"term_lists: expected a bool or a dict of list_len, group, summary_energy, doc_cut, got "
                        f"{type(spec).__name__}")
    check_spec(spec)
    return spec


def _ndocs(segments: list[_Segment], block_max: BlockMax | None, tail: SparseIndex | None, postings: bool) -> int:
    """Documents of an index state (SparseIndex._state): the segments', or without postings the block-max
    structure's and the tail's."""
    if postings:
        return sum(s.ndocs for s in segments)
    return block_max.ndocs + (len(tail) if tail is not None else 0)


def _with_tail(scores: torch.Tensor, ids: torch.Tensor, queries: SparseBatch, k: int, threads: int,
               tail: SparseIndex | None, split: int, allowed: torch.Tensor | None):
    """Results over the first ``split`` documents merged with the exhaustive tail's (its documents from split on)."""
    if tail is None:
        return scores, ids
    tail_scores, tail_ids = tail._exact(queries, k, threads, tail._state()[0],
                                        None if allowed is None else allowed[split:])
    tail_ids = torch.where(tail_ids >= 0, tail_ids + split, -1)
    return merge_top_k(torch.cat([scores, tail_scores], 1), torch.cat([ids, tail_ids], 1), k)


def merge_top_k(s: torch.Tensor, i: torch.Tensor, k: int):
    """Row-wise top k of (scores, ids) candidates (several results side by side): score descending, ties to the
    lower id, padding (id -1) last."""
    key = torch.where(i >= 0, i, torch.iinfo(torch.int64).max)
    order = torch.sort(key, dim=1, stable=True).indices
    order = order.gather(1, torch.sort(s.gather(1, order), dim=1, descending=True, stable=True).indices)
    return s.gather(1, order[:, :k]).contiguous(), i.gather(1, order[:, :k]).contiguous()


# How each stored tensor dtype is read with numpy (which has no bfloat16: its bits are read as uint16).
_NP_DTYPES = {torch.int64: np.dtype(np.int64), torch.int32: np.dtype(np.int32), torch.int16: np.dtype(np.int16),
              torch.uint8: np.dtype(np.uint8), torch.float32: np.dtype(np.float32),
              torch.float16: np.dtype(np.float16), torch.bfloat16: np.dtype(np.uint16)}


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous()
    return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()


def _read(f, dtype: np.dtype, offset: int, count: int, mmap: bool) -> np.ndarray:
    if count == 0:
        return np.empty(0, dtype)
    if mmap:  # copy-on-write: writable for torch, never written back
        return np.memmap(f, dtype=dtype, mode="c", offset=offset, shape=(count,))
    f.seek(offset)
    return np.fromfile(f, dtype=dtype, count=count)


def _posting_documents(segments: list[_Segment], lo: int, hi: int, dim: int, dtype: torch.dtype) -> SparseBatch:
    """Documents [lo, hi) of ``segments`` as a CPU SparseBatch, rebuilt from the postings (each row's terms
    ascending) into arrays allocated once, one segment at a time, so that the transient memory is one segment's."""
    parts, base = [], 0
    for s in segments:  # (segment, its first local row, past its last, first output row)
        a, b = max(lo, base), min(hi, base + s.ndocs)
        if a < b:
            parts.append((s, a - base, b - base, a - lo))
        base += s.ndocs

    def in_range(s, a, b):
        docs = s.docs.cpu()
        return None if a == 0 and b == s.ndocs else (docs >= a) & (docs < b)

    counts = []
    for s, a, b, _ in parts:
        keep = in_range(s, a, b)
        counts.append(s.docs.numel() if keep is None else int(keep.sum()))
    indptr = torch.zeros(hi - lo + 1, dtype=torch.int64)
    indices = torch.empty(sum(counts), dtype=torch.int32 if dim < 2**31 else torch.int64)
    values = torch.empty(sum(counts), dtype=dtype)
    at = 0
    for (s, a, b, out_row), m in zip(parts, counts):
        col = torch.repeat_interleave(torch.arange(dim) if s.terms is None else s.terms.cpu(),
                                      s.ptr.cpu().diff(), output_size=s.docs.numel())
        row, val, keep = s.docs.cpu(), s.weights.cpu(), in_range(s, a, b)
        if keep is not None:
            row, col, val = row[keep], col[keep], val[keep]
        # Postings run column by column, rows ascending within each: a stable sort by row leaves each row's
        # columns ascending.
        order = torch.sort(row, stable=True).indices
        indices[at:at + m] = col[order]
        values[at:at + m] = val[order]
        rows_out = indptr[out_row + 1:out_row + 1 + b - a]
        torch.cumsum(torch.bincount(row.long() - a, minlength=b - a), 0, out=rows_out)
        rows_out += at
        at += m
        del row, col, val, order, keep
    return SparseBatch(indptr, indices, values, dim, check=False)


def _held_by_all(segments: list[_Segment]) -> list[_Segment]:
    """Segments indexed by dimension, re-indexed by the dimensions any of them holds."""
    held = [s.ptr.diff().nonzero().flatten() for s in segments]
    terms = torch.unique(torch.cat(held)) if held else torch.empty(0, dtype=torch.int64)
    return [_Segment(widened_ptr(torch.cat([s.ptr[h], s.ptr[-1:]]), h, terms), s.docs, s.weights, s.ndocs, terms)
            for s, h in zip(segments, held)]


def _validate(seg: _Segment, dim: int, where: str) -> None:
    """The invariants the search kernels rely on for memory safety: offsets and sorted, in-range document ids."""
    if seg.ptr.numel() != dim + 1:
        raise ValueError(f"{where}: posting offsets are inconsistent")
    check_lists(seg.ptr, seg.docs, seg.ndocs, where, "posting lists (document ids)")


def _merge(a: _Segment, b: _Segment) -> _Segment:
    """One segment holding a's documents then b's: each dimension's postings of a, then those of b."""
    count_a, count_b = a.ptr.diff(), b.ptr.diff()
    # Entry p of a in column c moves past b's postings of columns < c; entry p of b past a's of columns <= c.
    pos_a = torch.arange(a.docs.numel(), device=a.ptr.device) + torch.repeat_interleave(
        b.ptr[:-1], count_a, output_size=a.docs.numel())
    pos_b = torch.arange(b.docs.numel(), device=a.ptr.device) + torch.repeat_interleave(
        a.ptr[1:], count_b, output_size=b.docs.numel())
    docs = torch.empty(a.docs.numel() + b.docs.numel(), dtype=torch.int32, device=a.ptr.device)
    weights = torch.empty(docs.numel(), dtype=a.weights.dtype, device=a.ptr.device)
    docs[pos_a], weights[pos_a] = a.docs, a.weights
    docs[pos_b], weights[pos_b] = b.docs + a.ndocs, b.weights
    return _Segment(a.ptr + b.ptr, docs, weights, a.ndocs + b.ndocs, a.terms)


# ---- fake implementations (torch.compile) ----------------------------------------------------------------------


@fake("sparse_search")
def _(q_indptr, q_indices, q_values, ptrs, docs, weights, sizes, k, num_threads, allowed=None):
    check_range(k, "k")
    nq = q_indptr.shape[0] - 1
    return (q_values.new_empty((nq, k), dtype=torch.float32), q_indptr.new_empty((nq, k), dtype=torch.int64))


@fake("build_postings")
def _(indptr, indices, values, dim):
    check_range(dim, "dim", 2**62)
    return (indptr.new_empty((dim + 1,)), indptr.new_empty(indices.shape, dtype=torch.int32),
            values.new_empty(values.shape))
