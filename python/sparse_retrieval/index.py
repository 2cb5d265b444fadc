"""`SparseIndex`: an exact inverted index over sparse documents, searched by dot product.

Postings are kept per dimension in CSC-like arrays: for a segment of documents, ``ptr[t]:ptr[t + 1]`` delimits the
postings of dimension ``t`` in ``docs`` (int32 document ids local to the segment, increasing) and ``weights``
(float32, float16 or bfloat16), so a posting costs 8 bytes or less. Documents are stored in segments of at most
``segment_size`` documents (a large collection is added chunk by chunk without rebuilding what is there); searching
visits every segment. The file format of ``save``/``load`` is described in docs/index_format.md.
"""
from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .sparse import SparseBatch

_ops = torch.ops.sparse_retrieval

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
_MAGIC = b"SRSPIDX\x00"
_VERSION = 1
_HEADER = struct.Struct("<8sIIQQQQ")  # magic, version, dtype code, dim, ndocs, nsegments, segment_size
_HEADER_SIZE = 64  # _HEADER, table crc32, header crc32, zero padding
_ENTRY = struct.Struct("<QQQQQIII12x")  # ndocs, nnz, offsets of ptr/docs/weights, crc32 of ptr/docs/weights
_ALIGN = 64


@dataclass
class _Segment:
    ptr: torch.Tensor      # int64 (dim + 1,)
    docs: torch.Tensor     # int32 (nnz,), local document ids
    weights: torch.Tensor  # (nnz,)
    ndocs: int

    def to(self, device) -> "_Segment":
        return _Segment(self.ptr.to(device), self.docs.to(device), self.weights.to(device), self.ndocs)


class SparseIndex:
    """Exact top-k retrieval by dot product over sparse documents (CPU, or CUDA after ``.to("cuda")``).

    ``SparseIndex(dim)`` is empty; ``from_documents(docs)`` builds one; ``add(docs)`` appends documents, their ids
    continuing from ``len(index)``. Searches may run concurrently from several threads; ``add`` must not run
    concurrently with anything else on the same index.
    """

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32, *, segment_size: int = 1 << 20,
                 device: torch.device | str = "cpu"):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected an int >= 1, got {dim!r}")
        if dtype not in _DTYPE_CODES:
            raise TypeError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
        if isinstance(segment_size, bool) or not isinstance(segment_size, int) or not 1 <= segment_size < 2**31:
            raise ValueError(f"segment_size: expected an int in [1, 2^31), got {segment_size!r}")
        self._dim = dim
        self._dtype = dtype
        self.segment_size = segment_size
        self._device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0", to compare with queries
        self._segments: list[_Segment] = []

    # ---- building ------------------------------------------------------------------------------------------------
    @classmethod
    def from_documents(cls, docs: SparseBatch, dtype: torch.dtype | None = None, *, segment_size: int = 1 << 20,
                       progress: bool = True) -> "SparseIndex":
        """An index over ``docs`` (ids 0 .. len(docs) - 1), weights stored as ``dtype`` (default: docs' dtype)."""
        if not isinstance(docs, SparseBatch):
            raise TypeError(f"docs: expected a SparseBatch, got {type(docs).__name__}")
        index = cls(docs.dim, dtype or docs.dtype, segment_size=segment_size, device=docs.device)
        index.add(docs, progress=progress)
        return index

    def add(self, docs: SparseBatch, *, progress: bool = True) -> None:
        """Appends ``docs``; they get ids ``len(self)`` .. ``len(self) + len(docs) - 1``."""
        if not isinstance(docs, SparseBatch):
            raise TypeError(f"docs: expected a SparseBatch, got {type(docs).__name__}")
        if docs.dim != self._dim:
            raise ValueError(f"docs: dim {docs.dim} differs from the index's dim {self._dim}")
        from tqdm.auto import tqdm

        n = len(docs)
        start = 0
        with tqdm(total=n, desc="indexing", unit="doc", disable=not progress or n <= self.segment_size) as bar:
            while start < n:
                last = self._segments[-1] if self._segments else None
                room = self.segment_size - last.ndocs if last is not None else 0
                take = min(n - start, room if room > 0 else self.segment_size)
                seg = self._build(docs[start:start + take])
                if room > 0:
                    self._segments[-1] = _merge(last, seg)
                else:
                    self._segments.append(seg)
                start += take
                bar.update(take)

    def _build(self, docs: SparseBatch) -> _Segment:
        # Postings are built on the CPU (a counting sort) and then moved to the index's device.
        cpu = docs.to("cpu")
        ptr, ids, weights = _ops.build_postings(cpu.indptr, cpu.indices, cpu.values.detach().to(self._dtype),
                                                self._dim)
        return _Segment(ptr, ids, weights, len(docs)).to(self._device)

    # ---- facts -----------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(s.ndocs for s in self._segments)

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
        """Number of postings."""
        return sum(s.docs.numel() for s in self._segments)

    @property
    def nbytes(self) -> int:
        """Bytes held by the index's tensors."""
        return sum(t.numel() * t.element_size() for s in self._segments for t in (s.ptr, s.docs, s.weights))

    def __repr__(self) -> str:
        return (f"SparseIndex(docs={len(self)}, dim={self._dim}, postings={self.nnz}, weights={self._dtype}, "
                f"segments={len(self._segments)}, device={self._device})")

    def to(self, device) -> "SparseIndex":
        """A copy of the index on ``device`` (searches then run there)."""
        out = SparseIndex(self._dim, self._dtype, segment_size=self.segment_size, device=device)
        out._segments = [s.to(out._device) for s in self._segments]
        return out

    # ---- search ----------------------------------------------------------------------------------------------------
    def search(self, queries: SparseBatch, k: int, threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k documents of each query by dot product: (scores float32 (nq, k), ids int64 (nq, k)).

        Scores descending, ties to the lower document id; with fewer than k documents the rest is score -inf and
        id -1. ``threads`` (CPU) defaults to ``torch.get_num_threads()``. Definition: ``reference.sparse_search``.
        """
        if not isinstance(queries, SparseBatch):
            raise TypeError(f"queries: expected a SparseBatch, got {type(queries).__name__}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k: expected an int >= 0, got {k!r}")
        if threads is None:
            threads = torch.get_num_threads()
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads: expected an int >= 1, got {threads!r}")
        if queries.device != self._device:
            raise ValueError(f"queries: on {queries.device}, the index is on {self._device}")
        if queries.nnz and int(queries.indices.max()) >= self._dim:
            raise ValueError(f"queries: dimension {int(queries.indices.max())} is beyond the index's dim "
                             f"{self._dim}")
        segs = self._segments or [self._build(SparseBatch.from_lists([], self._dim, dtype=self._dtype))]
        return _ops.sparse_search(queries.indptr, queries.indices, queries.values.detach(),
                                  [s.ptr for s in segs], [s.docs for s in segs], [s.weights for s in segs],
                                  [s.ndocs for s in segs], k, threads)

    # ---- files -----------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Writes the index to ``path`` atomically: a temporary file in the same folder, fsync, then rename."""
        path = Path(path)
        segs = [s.to("cpu") for s in self._segments]
        sections, entries, offset = [], [], _HEADER_SIZE + _ENTRY.size * len(segs)
        for s in segs:
            arrays = [_as_numpy(s.ptr), _as_numpy(s.docs), _as_numpy(s.weights)]
            offsets = []
            for a in arrays:
                offset = -(-offset // _ALIGN) * _ALIGN
                offsets.append(offset)
                sections.append((offset, a))
                offset += a.nbytes
            crcs = [zlib.crc32(a) for a in arrays]
            entries.append(_ENTRY.pack(s.ndocs, s.docs.numel(), *offsets, *crcs))
        table = b"".join(entries)
        head = _HEADER.pack(_MAGIC, _VERSION, _DTYPE_CODES[self._dtype], self._dim, len(self), len(segs),
                            self.segment_size)
        head += struct.pack("<I", zlib.crc32(table))
        head += struct.pack("<I", zlib.crc32(head))
        head = head.ljust(_HEADER_SIZE, b"\0")
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(head + table)
                for off, a in sections:
                    f.seek(off)
                    f.write(memoryview(a).cast("B"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True) -> "SparseIndex":
        """Reads an index written by ``save``; with ``mmap`` its arrays map the file instead of being read.
        Checksums and structure are verified; a truncated or corrupted file raises ``ValueError``."""
        path = Path(path)
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(_HEADER_SIZE)
            if len(head) < _HEADER_SIZE or head[:8] != _MAGIC:
                raise ValueError(f"{path}: not a sparse_retrieval index file (bad magic or shorter than a header)")
            magic, version, code, dim, ndocs, nseg, segment_size = _HEADER.unpack_from(head)
            table_crc, head_crc = struct.unpack_from("<II", head, _HEADER.size)
            if zlib.crc32(head[:_HEADER.size + 4]) != head_crc:
                raise ValueError(f"{path}: header checksum mismatch (corrupted file)")
            if version != _VERSION:
                raise ValueError(f"{path}: format version {version}, this library reads version {_VERSION}")
            if code not in _CODE_DTYPES:
                raise ValueError(f"{path}: unknown weight dtype code {code}")
            table = f.read(_ENTRY.size * nseg)
        if len(table) != _ENTRY.size * nseg:
            raise ValueError(f"{path}: truncated (segment table incomplete)")
        if zlib.crc32(table) != table_crc:
            raise ValueError(f"{path}: segment table checksum mismatch (corrupted file)")
        dtype = _CODE_DTYPES[code]
        index = cls(dim, dtype, segment_size=segment_size)
        for s in range(nseg):
            seg_docs, nnz, *rest = _ENTRY.unpack_from(table, s * _ENTRY.size)
            offsets, crcs = rest[:3], rest[3:]
            arrays = []
            for name, off, crc, count, t in zip(("ptr", "docs", "weights"), offsets, crcs, (dim + 1, nnz, nnz),
                                                (torch.int64, torch.int32, dtype)):
                np_dtype = _NP_DTYPES[t]
                if off + count * np_dtype.itemsize > size:
                    raise ValueError(f"{path}: truncated (segment {s} {name} ends past the end of the file)")
                a = _read(path, np_dtype, off, count, mmap)
                if zlib.crc32(a) != crc:
                    raise ValueError(f"{path}: checksum mismatch in segment {s} {name} (corrupted file)")
                arrays.append(torch.from_numpy(a).view(t) if t == torch.bfloat16 else torch.from_numpy(a))
            seg = _Segment(arrays[0], arrays[1], arrays[2], seg_docs)
            _validate(seg, dim, f"{path}: segment {s}")
            index._segments.append(seg)
        if len(index) != ndocs:
            raise ValueError(f"{path}: segments hold {len(index)} documents, the header says {ndocs}")
        return index


# ---- helpers -----------------------------------------------------------------------------------------------------


# How each stored tensor dtype is read with numpy (which has no bfloat16: its bits are read as uint16).
_NP_DTYPES = {torch.int64: np.dtype(np.int64), torch.int32: np.dtype(np.int32), torch.float32: np.dtype(np.float32),
              torch.float16: np.dtype(np.float16), torch.bfloat16: np.dtype(np.uint16)}


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous()
    return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()


def _read(path: Path, dtype: np.dtype, offset: int, count: int, mmap: bool) -> np.ndarray:
    if count == 0:
        return np.empty(0, dtype)
    if mmap:  # copy-on-write: writable for torch, never written back
        return np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=(count,))
    return np.fromfile(path, dtype=dtype, count=count, offset=offset)


def _validate(seg: _Segment, dim: int, where: str) -> None:
    """The invariants the search kernels rely on for memory safety: offsets and sorted, in-range document ids."""
    ptr, docs = seg.ptr, seg.docs
    if ptr.numel() != dim + 1 or int(ptr[0]) != 0 or int(ptr[-1]) != docs.numel() or bool((ptr.diff() < 0).any()):
        raise ValueError(f"{where}: posting offsets are inconsistent")
    if docs.numel():
        if int(docs.min()) < 0 or int(docs.max()) >= seg.ndocs:
            raise ValueError(f"{where}: document ids out of range [0, {seg.ndocs})")
        starts = torch.zeros(docs.numel(), dtype=torch.bool)
        starts[ptr[:-1][ptr.diff() > 0]] = True
        if bool(((docs[1:] <= docs[:-1]) & ~starts[1:]).any()):
            raise ValueError(f"{where}: posting lists are not sorted by document id")


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
    return _Segment(a.ptr + b.ptr, docs, weights, a.ndocs + b.ndocs)


# ---- fake implementations (torch.compile) ----------------------------------------------------------------------


@torch.library.register_fake("sparse_retrieval::sparse_search")
def _(q_indptr, q_indices, q_values, ptrs, docs, weights, sizes, k, num_threads):
    nq = q_indptr.shape[0] - 1
    return (q_values.new_empty((nq, k), dtype=torch.float32), q_indptr.new_empty((nq, k), dtype=torch.int64))


@torch.library.register_fake("sparse_retrieval::build_postings")
def _(indptr, indices, values, dim):
    return (indptr.new_empty((dim + 1,)), indptr.new_empty(indices.shape, dtype=torch.int32),
            values.new_empty(values.shape))
