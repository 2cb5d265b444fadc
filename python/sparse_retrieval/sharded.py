"""`ShardedIndex`: a collection split by document over the ranks of a ``torch.distributed`` process group (launched
with ``torchrun``), as every production engine shards: each rank holds its documents in a CPU `SparseIndex`, searches
them, and the per-rank top-k lists are gathered and merged. Tested with gloo (CPU tensors); NCCL needs CUDA tensors
for its collectives and is not supported yet.

Global ids: each rank keeps the global id of every local document (``ids``, increasing, so that local tie order
is global tie order). ``from_documents`` gives rank r a contiguous range; ``add`` splits new documents into one
contiguous range per rank, ids continuing from the global count. Exact search therefore returns exactly what one
big index over all documents would (scores, ids and ties).

Every method except the properties is collective: all ranks of the group call it, in the same order. An error on
one rank (bad documents or queries, a damaged shard file, a full disk) is gathered and raised as ``ValueError`` on
every rank before the next collective, so no rank is left waiting. A rank that dies or hangs makes the others raise
the backend's error within the group's timeout (``init_process_group(..., timeout=...)``; torch's default is 30
minutes for gloo, so set a shorter one for serving). Inconsistent shards (dim, weight dtype, shard count) raise on
every rank at build or load time.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ._files import write_atomic
from .external_ids import as_int_ids, as_mask, is_mask
from .index import SparseIndex, merge_top_k
from .sparse import SparseBatch, as_sparse_batch, cast_values

_MANIFEST = "manifest.json"
_FORMAT = 1


class ShardedIndex:
    """One shard per rank of ``group`` (default: the default group). Build with ``from_documents`` (documents
    scattered from one rank), ``from_local`` (each rank brings its own `SparseIndex`) or ``load``."""

    def __init__(self, local: SparseIndex, ids: torch.Tensor, total: int, group=None):
        self.local = local
        self.ids = ids  # int64, the global id of each local document, increasing
        self.total = total  # documents over all shards
        self.group = group

    # ---- building (collective) -------------------------------------------------------------------------------
    @classmethod
    def from_documents(cls, docs: SparseBatch | None, *, src: int = 0, group=None, **index_kwargs) -> "ShardedIndex":
        """Rank ``src`` passes ``docs`` (any format ``SparseIndex.search`` takes), the others None; rank r gets the
        r-th contiguous range of rows. ``index_kwargs`` go to ``SparseIndex.from_documents`` on every rank (e.g.
        ``block_max=True`` for safe and approximate search; ``progress`` defaults to False: one bar per rank)."""
        part, _ = _scatter_rows(docs, src, group)

        def build():
            if "ids" in index_kwargs:
                raise ValueError("ids: a ShardedIndex numbers documents globally itself")
            return SparseIndex.from_documents(part, **{"progress": False, **index_kwargs})

        return cls.from_local(_on_every_rank(build, group), group=group)

    @classmethod
    def from_local(cls, local: SparseIndex, *, group=None) -> "ShardedIndex":
        """Each rank passes its shard (a CPU index with positional ids); global ids follow rank order (rank 0's
        documents first)."""
        def check():
            if not isinstance(local, SparseIndex):
                raise TypeError(f"local: expected a SparseIndex, got {type(local).__name__}")
            if local._ids is not None or local.device.type != "cpu":
                raise ValueError("local: expected a CPU index with positional ids (no user ids, not compacted)")

        _on_every_rank(check, group)
        facts = _all_gather_object((len(local), local.dim, str(local.dtype)), group)
        _same_everywhere(facts, lambda f: f[1:], "dim and weight dtype")
        start = sum(f[0] for f in facts[:_rank(group)])
        total = sum(f[0] for f in facts)
        return cls(local, torch.arange(start, start + len(local), dtype=torch.int64), total, group)

    def add(self, docs: SparseBatch | None, *, src: int = 0) -> None:
        """Rank ``src`` passes the new documents, the others None; each rank appends one contiguous range of them,
        their global ids continuing from ``total``."""
        part, n = _scatter_rows(docs, src, self.group)

        def check():  # what could make one rank's add fail, agreed on before any rank adds
            if part.dim != self.local.dim:
                raise ValueError(f"docs: dim {part.dim} differs from the index's dim {self.local.dim}")
            return cast_values(part.values, self.local.dtype, "docs values")

        values = _on_every_rank(check, self.group)
        bounds = _split_bounds(n, _world(self.group))
        lo = self.total + bounds[_rank(self.group)]
        self.local.add(SparseBatch(part.indptr, part.indices, values, part.dim, check=False), progress=False)
        self.ids = torch.cat([self.ids, torch.arange(lo, lo + len(part), dtype=torch.int64)])
        self.total += n

    # ---- search (collective) ---------------------------------------------------------------------------------
    def search(self, queries, k: int, threads: int | None = None, *, src: int | None = None, **search_kwargs):
        """Global top-k of each query: (scores float32 (nq, k), global ids int64 (nq, k)), on every rank, with
        ``SparseIndex.search``'s order, ties and padding. With ``src`` only that rank passes the queries (the others
        None) and they are broadcast; otherwise every rank passes the same queries. ``search_kwargs`` (``mode``,
        ``alpha``, ``query_cut``, and ``filter``: global ids or a bool mask over all documents, the same on every
        rank) go to each shard's search."""
        queries_in = queries
        if src is not None:
            queries = None
            if _rank(self.group) == src:
                try:
                    queries = as_sparse_batch(queries_in, "queries")
                except Exception as exc:
                    queries = f"rank {src}: {type(exc).__name__}: {exc}"
            queries = _broadcast_object(queries, src, self.group)
            if isinstance(queries, str):
                raise ValueError(queries)

        def local_search():
            kw = dict(search_kwargs)
            if kw.get("filter") is not None:
                kw["filter"] = self._local_positions(kw["filter"], "filter")
            return self.local.search(queries, k, threads, **kw)

        scores, local = _on_every_rank(local_search, self.group)
        ids = torch.full_like(local, -1)
        hit = local >= 0
        ids[hit] = self.ids[local[hit]]
        # One gather of scores and ids together, as float64 (exact for float32 scores and ids below 2^53).
        packed = torch.stack([scores.double(), ids.double()])
        parts = [torch.empty_like(packed) for _ in range(_world(self.group))]
        dist.all_gather(parts, packed, group=self.group)
        allp = torch.cat(parts, 2)
        return merge_top_k(allp[0].float(), allp[1].long(), k)

    def delete(self, ids) -> None:
        """Deletes documents by global id (every rank passes the same ids; each deletes those it holds). Unknown
        ids raise on every rank and delete nothing."""
        _on_every_rank(lambda: self.local.delete(self._local_positions(ids, "ids")), self.group)

    def _local_positions(self, ids, name: str):
        """Global ids (or a bool mask over all ``total`` documents) -> this shard's positions (or mask)."""
        if is_mask(ids):
            return as_mask(ids, self.total, name)[self.ids]
        ids = as_int_ids(ids, name, below=self.total)
        pos = torch.searchsorted(self.ids, ids).clamp(max=max(len(self.ids) - 1, 0))
        return pos[self.ids[pos] == ids] if len(self.ids) else pos[:0]

    # ---- files (collective) ----------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> None:
        """One index file per shard (``shard-<rank>.sridx``, with its global ids in ``shard-<rank>.ids``) and a
        manifest (shard count, dim, dtype, documents and ids checksum per shard), written by rank 0 after every
        shard is on disk. Each file is written atomically."""
        folder = Path(folder)
        rank = _rank(self.group)
        ids = self.ids.numpy().astype("<i8").tobytes()

        def write_shard():  # every rank creates the folder: it need not be shared storage
            folder.mkdir(parents=True, exist_ok=True)
            self.local.save(folder / f"shard-{rank}.sridx")
            write_atomic(folder / f"shard-{rank}.ids", lambda f: f.write(ids))

        _on_every_rank(write_shard, self.group)
        shards = _all_gather_object({"docs": len(self.local), "ids_crc32": zlib.crc32(ids)}, self.group)

        def write_manifest():
            if rank == 0:
                manifest = {"format": _FORMAT, "shards": len(shards), "dim": self.local.dim,
                            "dtype": str(self.local.dtype), "total": self.total, "per_shard": shards}
                write_atomic(folder / _MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))

        _on_every_rank(write_manifest, self.group)

    @classmethod
    def load(cls, folder: str | os.PathLike, *, group=None, mmap: bool = True) -> "ShardedIndex":
        """Reads a folder written by ``save``; needs as many ranks as it has shards (else ValueError on every
        rank)."""
        folder = Path(folder)
        rank, world = _rank(group), _world(group)
        try:
            manifest = json.loads((folder / _MANIFEST).read_text())
            problem = None
            if manifest.get("format") != _FORMAT:
                problem = f"{folder}: unknown manifest format {manifest.get('format')!r}"
            elif manifest["shards"] != world:
                problem = (f"{folder}: {manifest['shards']} shards saved, {world} ranks loading; load with as many "
                           f"ranks as shards")
        except Exception as exc:  # any problem must reach every rank, or they would wait for this one
            problem = f"{folder}: unreadable manifest ({type(exc).__name__}: {exc})"
        _raise_if_any(problem, group)
        problem, local, ids = None, None, None
        try:
            local = SparseIndex.load(folder / f"shard-{rank}.sridx", mmap=mmap)
            raw = (folder / f"shard-{rank}.ids").read_bytes()
            want = manifest["per_shard"][rank]
            if zlib.crc32(raw) != want["ids_crc32"] or len(raw) != 8 * want["docs"] or len(local) != want["docs"]:
                raise ValueError(f"{folder}: shard {rank}'s ids or documents do not match the manifest")
            ids = torch.from_numpy(np.frombuffer(raw, dtype="<i8").copy())
            if (local.dim, str(local.dtype)) != (manifest["dim"], manifest["dtype"]):
                raise ValueError(f"{folder}: shard {rank} has dim {local.dim} / {local.dtype}, the manifest "
                                 f"{manifest['dim']} / {manifest['dtype']}")
        except Exception as exc:
            problem = f"rank {rank}: {type(exc).__name__}: {exc}"
        _raise_if_any(problem, group)
        return cls(local, ids, manifest["total"], group)

    def __len__(self) -> int:
        return self.total

    def __repr__(self) -> str:
        return (f"ShardedIndex(docs={self.total}, shards={_world(self.group)}, rank={_rank(self.group)}, "
                f"local={self.local!r})")


# ---- collectives -------------------------------------------------------------------------------------------------


def _rank(group) -> int:
    return dist.get_rank(group)


def _world(group) -> int:
    return dist.get_world_size(group)


def _all_gather_object(obj, group) -> list:
    out = [None] * _world(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _broadcast_object(obj, src: int, group):
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, src) if group is not None else src, group=group)
    return box[0]


def _on_every_rank(fn, group):
    """fn()'s result on this rank; when fn raised on any rank, ValueError on every rank (none is left waiting in
    the next collective). One small all-reduce when all went well; the messages are gathered only on failure."""
    try:
        out, problem = fn(), None
    except Exception as exc:
        out, problem = None, f"rank {_rank(group)}: {type(exc).__name__}: {exc}"
    failed = torch.tensor([problem is not None], dtype=torch.int32)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
    if int(failed):
        _raise_if_any(problem, group)
    return out


def _raise_if_any(problem: str | None, group) -> None:
    """Raises on every rank when any rank found a problem (so no rank goes on into a collective alone)."""
    problems = [p for p in _all_gather_object(problem, group) if p]
    if problems:
        raise ValueError("; ".join(problems))


def _same_everywhere(facts: list, key, what: str) -> None:
    if len({key(f) for f in facts}) > 1:
        raise ValueError(f"shards disagree on {what}: " + ", ".join(f"rank {r}: {key(f)}" for r, f in
                                                                    enumerate(facts)))


def _split_bounds(n: int, parts: int) -> list[int]:
    return [n * r // parts for r in range(parts + 1)]


def _scatter_rows(docs, src: int, group) -> tuple[SparseBatch, int]:
    """Rank ``src``'s batch split into one contiguous range of rows per rank (as CSR arrays, pickled), and the
    batch's length. A problem with the batch on ``src`` raises on every rank."""
    world = _world(group)
    pieces = None
    if _rank(group) == src:
        try:
            if docs is None:
                raise ValueError(f"docs: rank {src} (src) must pass the documents")
            docs = as_sparse_batch(docs, "docs").to("cpu")
            bounds = _split_bounds(len(docs), world)
            # Copies, not views: pickling a view sends its whole storage.
            pieces = [(docs.indptr[bounds[r]:bounds[r + 1] + 1] - docs.indptr[bounds[r]],
                       docs.indices[docs.indptr[bounds[r]]:docs.indptr[bounds[r + 1]]].clone(),
                       docs.values[docs.indptr[bounds[r]]:docs.indptr[bounds[r + 1]]].detach().clone(), docs.dim,
                       len(docs)) for r in range(world)]
        except Exception as exc:
            pieces = [f"rank {src}: {type(exc).__name__}: {exc}"] * world
    box = [None]
    dist.scatter_object_list(box, pieces, src=dist.get_global_rank(group, src) if group is not None else src,
                             group=group)
    if isinstance(box[0], str):
        raise ValueError(box[0])
    indptr, indices, values, dim, n = box[0]
    return SparseBatch(indptr, indices, values, dim, check=False), n
