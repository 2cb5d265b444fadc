"""`ShardedIndex`: a collection split by document over the ranks of a ``torch.distributed`` process group (gloo on
CPUs, NCCL between GPUs; launched with ``torchrun``), as every production engine shards: each rank holds its
documents in a `SparseIndex`, searches them, and the per-rank top-k lists are gathered and merged.

Global ids: each rank keeps the global id of every local document (``ids``, increasing, so that local tie order
is global tie order). ``from_documents`` gives rank r a contiguous range; ``add`` splits new documents into one
contiguous range per rank, ids continuing from the global count. Exact search therefore returns exactly what one
big index over all documents would (scores, ids and ties).

Every method except the properties is collective: all ranks of the group call it, in the same order. A rank that
dies or hangs makes the others raise the backend's error within the group's timeout (``init_process_group(...,
timeout=...)``; torch's default is 30 minutes for gloo, so set a shorter one for serving). Inconsistent shards (dim,
weight dtype, shard count) raise ``ValueError`` on every rank at build or load time.
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
from .index import SparseIndex, merge_top_k
from .sparse import SparseBatch, as_sparse_batch

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
        ``block_max=True`` for safe and approximate search)."""
        part, _ = _scatter_rows(docs, src, group)
        local = SparseIndex.from_documents(part, progress=False, **index_kwargs)
        return cls.from_local(local, group=group)

    @classmethod
    def from_local(cls, local: SparseIndex, *, group=None) -> "ShardedIndex":
        """Each rank passes its shard; global ids follow rank order (rank 0's documents first)."""
        if not isinstance(local, SparseIndex):
            raise TypeError(f"local: expected a SparseIndex, got {type(local).__name__}")
        facts = _all_gather_object((len(local), local.dim, str(local.dtype)), group)
        _same_everywhere(facts, lambda f: f[1:], "dim and weight dtype")
        start = sum(f[0] for f in facts[:_rank(group)])
        total = sum(f[0] for f in facts)
        return cls(local, torch.arange(start, start + len(local), dtype=torch.int64), total, group)

    def add(self, docs: SparseBatch | None, *, src: int = 0) -> None:
        """Rank ``src`` passes the new documents, the others None; each rank appends one contiguous range of them,
        their global ids continuing from ``total``."""
        part, n = _scatter_rows(docs, src, self.group)
        if part.dim != self.local.dim:  # the same on every rank: all raise
            raise ValueError(f"docs: dim {part.dim} differs from the index's dim {self.local.dim}")
        bounds = _split_bounds(n, _world(self.group))
        lo = self.total + bounds[_rank(self.group)]
        self.local.add(part, progress=False)
        self.ids = torch.cat([self.ids, torch.arange(lo, lo + len(part), dtype=torch.int64)])
        self.total += n

    # ---- search (collective) ---------------------------------------------------------------------------------
    def search(self, queries, k: int, threads: int | None = None, *, src: int | None = None, **search_kwargs):
        """Global top-k of each query: (scores float32 (nq, k), global ids int64 (nq, k)), on every rank, with
        ``SparseIndex.search``'s order, ties and padding. With ``src`` only that rank passes the queries (the others
        None) and they are broadcast; otherwise every rank passes the same queries. ``search_kwargs`` (``mode``,
        ``alpha``, ``query_cut``) go to each shard's search."""
        if src is not None:
            queries = _broadcast_object(None if queries is None else as_sparse_batch(queries, "queries"), src,
                                        self.group)
        scores, local = self.local.search(queries, k, threads, **search_kwargs)
        ids = torch.full_like(local, -1)
        hit = local >= 0
        ids[hit] = self.ids[local[hit]]
        world = _world(self.group)
        all_scores = [torch.empty_like(scores) for _ in range(world)]
        all_ids = [torch.empty_like(ids) for _ in range(world)]
        dist.all_gather(all_scores, scores, group=self.group)
        dist.all_gather(all_ids, ids, group=self.group)
        return merge_top_k(torch.cat(all_scores, 1), torch.cat(all_ids, 1), k)

    # ---- files (collective) ----------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> None:
        """One index file per shard (``shard-<rank>.sridx``, with its global ids in ``shard-<rank>.ids``) and a
        manifest (shard count, dim, dtype, documents and ids checksum per shard), written by rank 0 after every
        shard is on disk. Each file is written atomically."""
        folder = Path(folder)
        rank = _rank(self.group)
        if rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
        dist.barrier(group=self.group)
        self.local.save(folder / f"shard-{rank}.sridx")
        ids = self.ids.numpy().astype("<i8").tobytes()
        write_atomic(folder / f"shard-{rank}.ids", lambda f: f.write(ids))
        shards = _all_gather_object({"docs": len(self.local), "ids_crc32": zlib.crc32(ids)}, self.group)
        if rank == 0:
            manifest = {"format": _FORMAT, "shards": len(shards), "dim": self.local.dim,
                        "dtype": str(self.local.dtype), "total": self.total, "per_shard": shards}
            write_atomic(folder / _MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        dist.barrier(group=self.group)

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
        except (OSError, ValueError, KeyError) as exc:
            problem = f"{folder}: unreadable manifest ({exc})"
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
        except (OSError, ValueError) as exc:
            problem = f"rank {rank}: {exc}"
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
            pieces = [(docs.indptr[bounds[r]:bounds[r + 1] + 1] - docs.indptr[bounds[r]],
                       docs.indices[docs.indptr[bounds[r]]:docs.indptr[bounds[r + 1]]],
                       docs.values[docs.indptr[bounds[r]]:docs.indptr[bounds[r + 1]]], docs.dim, len(docs))
                      for r in range(world)]
        except (TypeError, ValueError) as exc:
            pieces = [f"rank {src}: {type(exc).__name__}: {exc}"] * world
    box = [None]
    dist.scatter_object_list(box, pieces, src=dist.get_global_rank(group, src) if group is not None else src,
                             group=group)
    if isinstance(box[0], str):
        raise ValueError(box[0])
    indptr, indices, values, dim, n = box[0]
    return SparseBatch(indptr, indices, values, dim, check=False), n
