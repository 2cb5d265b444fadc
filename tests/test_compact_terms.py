"""Indexes over a huge dim keep offsets for the terms their documents hold (compact_terms.py): memory does not grow
with dim, every search mode gives the reference's results (scores bit for bit as an index over the same documents
in a small dim), through add, optimize, delete, save/load (mmap or not) and files written per dimension."""
import struct

import pytest
import torch

import sparse_retrieval as sr
import sparse_retrieval.compact_terms as compact_terms
from sparse_retrieval import reference
from sparse_retrieval.sparse import SparseBatch

from test_block_search import assert_same, clustered, queries_for

BIG = 1 << 26


def spread(batch, dim=BIG, stride=4099):
    """batch with dimension t moved to t * stride + 7 (order kept) in a space of `dim` dimensions."""
    return SparseBatch(batch.indptr, batch.indices.long() * stride + 7, batch.values, dim)


def corpus(seed, n=600, dim=250):
    gen = torch.Generator().manual_seed(seed)
    docs = clustered(n, dim, 5, gen)
    queries = queries_for(docs, 30, gen, negative=True)
    # with terms no document holds, at both ends of the space
    rows = [[3] + (q.indices.long() * 4099 + 7).tolist() + [BIG - 1] for q in queries]
    vals = [[1.0] + q.values.tolist() + [2.0] for q in queries]
    big_queries = SparseBatch.from_lists(list(zip(rows, vals)), BIG)
    return docs, queries, big_queries


def test_memory_does_not_grow_with_dim():
    index = sr.SparseIndex.from_documents(SparseBatch.from_lists([([5, BIG - 2], [1.0, 2.0])], BIG),
                                          block_max=True, progress=False)
    assert index.nbytes < 1 << 20  # per dimension it would be 512 MiB of offsets alone
    scores, ids = index.search(SparseBatch.from_lists([([BIG - 2], [3.0])], BIG), 2)
    assert ids.tolist() == [[0, -1]] and scores[0, 0].item() == 6.0


@pytest.mark.parametrize("k", [1, 9, 700])
def test_every_mode_matches_the_small_dim_index(simd, k):
    docs, small_queries, queries = corpus(k)
    small = sr.SparseIndex.from_documents(docs, block_max=True, block_size=8, progress=False)
    index = sr.SparseIndex.from_documents(spread(docs), block_max=True, block_size=8, segment_size=256,
                                          progress=False)
    assert index.block_max.terms is not None and len(index._segments) == 3
    want = small.search(small_queries, k, mode="exact")
    assert torch.equal(want[1], reference.sparse_search(small_queries, docs, k)[1])
    for mode in ("exact", "safe"):
        assert_same(index.search(queries, k, mode=mode), want)
    assert_same(index.search(queries, k, mode="approximate", alpha=0.7),
                small.search(small_queries, k, mode="approximate", alpha=0.7))


def test_add_delete_filter_save_load(tmp_path):
    docs, small_queries, queries = corpus(3)
    more = clustered(90, 400, 5, torch.Generator().manual_seed(4))  # new terms (250 .. 399) join the list
    index = sr.SparseIndex.from_documents(spread(docs), block_max=True, segment_size=256, progress=False)
    index.add(spread(more))
    index.delete([2, 650])
    small = sr.SparseIndex(400, segment_size=256)
    small.add(SparseBatch(docs.indptr, docs.indices, docs.values, 400))
    small.add(more)
    small.optimize(progress=False)
    small.delete([2, 650])
    small_queries = SparseBatch(small_queries.indptr, small_queries.indices, small_queries.values, 400)
    mask = torch.rand(690, generator=torch.Generator().manual_seed(5)) < 0.3
    for kw in ({}, {"filter": mask}):
        want = small.search(small_queries, 12, mode="exact", **kw)
        for mode in ("exact", "safe"):
            assert_same(index.search(queries, 12, mode=mode, **kw), want)
    path = tmp_path / "big.sridx"
    index.save(path)
    assert struct.unpack_from("<I", path.read_bytes(), 8)[0] == 4
    for mmap in (True, False):
        loaded = sr.SparseIndex.load(path, mmap=mmap)
        assert loaded.nbytes == index.nbytes
        for mode in ("exact", "safe"):
            assert_same(loaded.search(queries, 12, mode=mode), index.search(queries, 12, mode="exact"))
    small_path = tmp_path / "small.sridx"
    small.save(small_path)  # per dimension: still version 3, readable by older versions
    assert struct.unpack_from("<I", small_path.read_bytes(), 8)[0] == 3


def test_files_written_per_dimension_load_compact(tmp_path, monkeypatch):
    """A file over a dim above COMPACT_DIM written with offsets per dimension (before version 4) loads with its
    offsets re-indexed by the terms held."""
    dim = (1 << 20) + 5000
    docs, _, _ = corpus(6, n=120)
    small_queries = queries_for(docs, 12, torch.Generator().manual_seed(7))
    queries = spread(small_queries, dim, stride=3000)
    with monkeypatch.context() as m:
        m.setattr(compact_terms, "COMPACT_DIM", 1 << 30)
        old = sr.SparseIndex.from_documents(spread(docs, dim, stride=3000), segment_size=50, progress=False)
        old.save(tmp_path / "old")
    assert struct.unpack_from("<I", (tmp_path / "old").read_bytes(), 8)[0] == 3
    loaded = sr.SparseIndex.load(tmp_path / "old")
    assert all(s.terms is not None and s.ptr.numel() == s.terms.numel() + 1 for s in loaded._segments)
    assert loaded.nbytes < old.nbytes / 10
    small = sr.SparseIndex.from_documents(docs, segment_size=50, progress=False)
    assert_same(loaded.search(queries, 7), small.search(small_queries, 7))
    more = clustered(10, 300, 2, torch.Generator().manual_seed(8))
    loaded.add(spread(more, dim, stride=3000))
    small = sr.SparseIndex.from_documents(SparseBatch.cat([SparseBatch(docs.indptr, docs.indices, docs.values, 300),
                                                           more]), segment_size=50, progress=False)
    small_queries = SparseBatch(small_queries.indptr, small_queries.indices, small_queries.values, 300)
    assert_same(loaded.search(queries, 7), small.search(small_queries, 7))


def test_files_load_under_another_threshold(tmp_path, monkeypatch):
    """A file written with offsets per term held loads per dimension where this library's COMPACT_DIM is higher."""
    dim = (1 << 20) + 5000
    docs, _, _ = corpus(10, n=80)
    queries = spread(queries_for(docs, 10, torch.Generator().manual_seed(11)), dim, stride=3000)
    index = sr.SparseIndex.from_documents(spread(docs, dim, stride=3000), segment_size=30, progress=False)
    assert index._segments[0].terms is not None
    index.save(tmp_path / "x")
    monkeypatch.setattr(compact_terms, "COMPACT_DIM", 1 << 30)
    loaded = sr.SparseIndex.load(tmp_path / "x")
    assert all(s.terms is None and s.ptr.numel() == dim + 1 for s in loaded._segments)
    assert_same(loaded.search(queries, 6), index.search(queries, 6))


def test_damaged_term_lists_raise(tmp_path):
    docs, _, _ = corpus(9, n=50)
    index = sr.SparseIndex.from_documents(spread(docs), progress=False)
    path = tmp_path / "x"
    index.save(path)
    data = bytearray(path.read_bytes())
    terms = index._segments[0].terms
    at = bytes(data).find(terms.numpy().tobytes())
    assert at > 0
    data[at:at + 16] = data[at + 8:at + 16] + data[at:at + 8]  # swap the first two terms: not increasing
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError):
        sr.SparseIndex.load(path)
