"""Indexes with structures left out: without the exhaustive postings (``optimize(keep_postings=False)``) every
search mode gives the results of the same index with postings (scores bit for bit), and without the block maxima
(``block_maxima=False``, term lists only) approximate and exact search give those of the full index, through
filters, deletes, add (the tail), compact, optimize again, save/load (mmap or not) and a huge dim; what such an
index cannot do raises."""
import struct
import zlib

import numpy as np
import pytest
import torch

import sparse_retrieval as sr
from sparse_retrieval import reference
from sparse_retrieval.block_search import build_block_max, term_scales
from sparse_retrieval.sparse import SparseBatch

from test_block_search import assert_same, clustered, queries_for
from test_compact_terms import spread


def pair(docs, **kwargs):
    """The same documents indexed with and without postings."""
    kwargs = {"block_max": True, "block_size": 8, "progress": False, **kwargs}
    return (sr.SparseIndex.from_documents(docs, **kwargs),
            sr.SparseIndex.from_documents(docs, keep_postings=False, **kwargs))


def assert_modes_agree(full, bare, queries, k, **search):
    for mode in ("exact", "safe"):
        assert_same(bare.search(queries, k, mode=mode, **search), full.search(queries, k, mode=mode, **search))
    for alpha in (0.6, 1.0):
        assert_same(bare.search(queries, k, mode="approximate", alpha=alpha, **search),
                    full.search(queries, k, mode="approximate", alpha=alpha, **search))


@pytest.mark.parametrize("n,k", [(1, 1), (97, 5), (777, 40), (300, 400)])
@pytest.mark.parametrize("kind", ["clustered", "coarse"])
def test_every_mode_matches_the_index_with_postings(simd, n, k, kind):
    gen = torch.Generator().manual_seed(n + k)
    docs = clustered(n, 300, 6, gen, coarse=kind == "coarse")
    queries = queries_for(docs, 40, gen, negative=True)  # empty rows, fewer than k matches: the exhaustive path
    full, bare = pair(docs)
    assert not bare._segments and len(bare) == n and bare.nnz == full.nnz
    assert bare.nbytes == full.nbytes - sum(s.nbytes for s in full._segments)
    want = full.search(queries, k, mode="exact")
    assert torch.equal(want[1], reference.sparse_search(queries, docs, k)[1])
    for threads in (1, 3):
        assert_same(bare.search(queries, k, threads, mode="exact"), want)
    assert_modes_agree(full, bare, queries, k)


def test_term_lists_without_postings():
    gen = torch.Generator().manual_seed(5)
    docs = clustered(1200, 400, 10, gen)
    queries = queries_for(docs, 40, gen)
    full, bare = pair(docs, term_lists={"list_len": 64, "group": 4})
    for alpha in (0.8, 1.1, 2.0):
        assert_same(bare.search(queries, 10, mode="approximate", alpha=alpha),
                    full.search(queries, 10, mode="approximate", alpha=alpha))
    assert_same(bare.search(queries, 10, mode="exact"), full.search(queries, 10, mode="exact"))


@pytest.mark.parametrize("share", [0.002, 0.05, 0.5])
def test_filters_and_deletes(share):
    gen = torch.Generator().manual_seed(int(share * 1000))
    docs = clustered(1500, 400, 6, gen)
    queries = queries_for(docs, 30, gen)
    full, bare = pair(docs)
    mask = torch.rand(1500, generator=gen) < share
    assert_modes_agree(full, bare, queries, 7, filter=mask)
    gone = torch.randperm(1500, generator=gen)[:200]
    full.delete(gone)
    bare.delete(gone)
    assert_modes_agree(full, bare, queries, 7)
    assert_modes_agree(full, bare, queries, 7, filter=mask)
    full.compact(progress=False)
    bare.compact(progress=False)
    assert not bare._segments and len(bare) == len(full) == 1300 and bare.ndeleted == 0
    assert_modes_agree(full, bare, queries, 7)


def test_add_then_optimize_with_or_without_postings():
    gen = torch.Generator().manual_seed(8)
    docs = clustered(900, 500, 8, gen)
    queries = queries_for(docs, 40, gen)
    whole = sr.SparseIndex.from_documents(docs)
    index = sr.SparseIndex.from_documents(docs[:600], block_max=True, keep_postings=False, progress=False)
    index.add(docs[600:750], progress=False)
    index.add(docs[750:], progress=False)
    assert len(index) == 900 and not index._segments and index._tail is not None
    for mode in ("exact", "safe"):
        assert_same(index.search(queries, 12, mode=mode), whole.search(queries, 12))
    assert torch.equal(index._documents(550, 800).to_dense(), docs[550:800].to_dense())
    index.optimize(keep_postings=False, progress=False)  # folds the tail in, still without postings
    assert index.block_max.ndocs == 900 and index._tail is None and not index._segments
    assert_same(index.search(queries, 12, mode="exact"), whole.search(queries, 12))
    index.optimize(progress=False)  # postings rebuilt
    assert index._postings and sum(s.ndocs for s in index._segments) == 900
    assert_same(index.search(queries, 12, mode="exact"), whole.search(queries, 12))


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("tail", [0, 40])
def test_save_load(tmp_path, mmap, tail):
    gen = torch.Generator().manual_seed(9 + tail)
    docs = clustered(500, 300, 5, gen)
    queries = queries_for(docs, 30, gen)
    ids = [f"doc-{i}" for i in range(500)]
    index = sr.SparseIndex.from_documents(docs[:500 - tail], ids=ids[:500 - tail], block_max=True, block_size=16,
                                          keep_postings=False, term_lists={"list_len": 50}, progress=False)
    if tail:
        index.add(docs[500 - tail:], ids=ids[500 - tail:], progress=False)
    index.delete(["doc-3", "doc-499"])
    index.save(tmp_path / "x.sridx")
    assert struct.unpack_from("<I", (tmp_path / "x.sridx").read_bytes(), 8)[0] == 6  # term lists
    loaded = sr.SparseIndex.load(tmp_path / "x.sridx", mmap=mmap)
    assert not loaded._segments and len(loaded) == 500 and loaded.block_max.ndocs == 500 - tail
    assert loaded.block_max.lists is not None and loaded.ndeleted == 2
    for mode in ("exact", "safe", "approximate"):
        got, want = loaded.search(queries, 9, mode=mode), index.search(queries, 9, mode=mode)
        assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    # a file of an index with postings keeps the version older readers take
    sr.SparseIndex.from_documents(docs, block_max=True, progress=False).save(tmp_path / "y.sridx")
    assert struct.unpack_from("<I", (tmp_path / "y.sridx").read_bytes(), 8)[0] == 3


def _rewrite_extra(path, name, value):
    """Replaces extra array ``name`` (int64) of an index file by ``value``, every checksum redone."""
    raw = bytearray(path.read_bytes())
    _, _, _, _, _, nseg, _, nextra = struct.unpack_from("<8sIIQQQQQ", raw)
    entry, extra = sr.index._ENTRY.size, sr.index._EXTRA.size
    table_at = 64 + entry * nseg
    for e in range(nextra):
        at = table_at + extra * e
        entry_name, code, off, count, _ = struct.unpack_from("<32sIQQI", raw, at)
        if entry_name.rstrip(b"\0").decode() == name:
            raw[off:off + 8 * count] = np.asarray(value, dtype=np.int64).tobytes()
            struct.pack_into("<I", raw, at + 52, zlib.crc32(bytes(raw[off:off + 8 * count])))
    table = bytes(raw[64:table_at + extra * nextra])
    struct.pack_into("<I", raw, 56, zlib.crc32(table))
    struct.pack_into("<I", raw, 60, zlib.crc32(bytes(raw[:60])))
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("value", [[0], [-1], [10**9], [150]])
def test_inconsistent_files_raise(tmp_path, value):
    gen = torch.Generator().manual_seed(2)
    docs = clustered(200, 100, 4, gen)
    index = sr.SparseIndex.from_documents(docs[:160], block_max=True, keep_postings=False, progress=False)
    index.add(docs[160:], progress=False)
    index.save(tmp_path / "x")
    assert len(sr.SparseIndex.load(tmp_path / "x")) == 200
    _rewrite_extra(tmp_path / "x", "postings_from", value)
    with pytest.raises(ValueError, match="postings_from|segments hold|block-max sizes"):
        sr.SparseIndex.load(tmp_path / "x")


def test_huge_dim():
    gen = torch.Generator().manual_seed(3)
    docs = clustered(600, 250, 5, gen)
    queries = queries_for(docs, 30, gen, negative=True)
    big_docs = spread(docs)
    big_queries = SparseBatch(queries.indptr, queries.indices.long() * 4099 + 7, queries.values, big_docs.dim)
    full, bare = pair(big_docs)
    assert bare.block_max.terms is not None
    assert_modes_agree(full, bare, big_queries, 9)
    assert torch.equal(bare._documents(0, 600).indices.long(), big_docs.indices.long())


def test_what_it_cannot_do_raises():
    gen = torch.Generator().manual_seed(4)
    docs = clustered(300, 400, 4, gen)
    _, bare = pair(docs)
    long_query = SparseBatch.from_lists([(list(range(300)), [1.0] * 300)], 400)
    with pytest.raises(ValueError, match="more than 255 terms"):
        bare.search(long_query, 5, mode="exact")
    nan_query = SparseBatch(torch.tensor([0, 2]), torch.tensor([1, 2], dtype=torch.int32),
                            torch.tensor([float("nan"), 1.0]), 400, check=False)
    with pytest.raises(ValueError, match="non-finite"):
        bare.search(nan_query, 5)
    with pytest.raises(ValueError, match="CPU only"):
        bare.to("meta")
    with pytest.raises(ValueError, match="keep_postings: needs the block-max structure"):
        sr.SparseIndex.from_documents(docs, keep_postings=False)
    with pytest.raises(TypeError, match="keep_postings"):
        sr.SparseIndex.from_documents(docs, block_max=True, keep_postings="no", progress=False)


LISTS = {"list_len": 64, "group": 4}


@pytest.mark.parametrize("keep_postings", [True, False])
def test_without_block_maxima_approximate_and_exact_match_the_full_index(simd, keep_postings):
    gen = torch.Generator().manual_seed(21)
    docs = clustered(1300, 400, 10, gen, coarse=True)
    queries = queries_for(docs, 40, gen, negative=True)
    full = sr.SparseIndex.from_documents(docs, block_max=True, term_lists=LISTS, progress=False)
    lean = sr.SparseIndex.from_documents(docs, block_max=True, term_lists=LISTS, block_maxima=False,
                                         keep_postings=keep_postings, progress=False)
    assert not lean.block_max.maxima and lean.nbytes < full.nbytes
    assert torch.equal(lean.block_max.scale, full.block_max.scale)
    mask = torch.rand(1300, generator=gen) < 0.3
    for alpha in (0.8, 1.1, 3.0):
        for search in ({}, {"filter": mask}, {"query_cut": 2}):
            assert_same(lean.search(queries, 10, mode="approximate", alpha=alpha, **search),
                        full.search(queries, 10, mode="approximate", alpha=alpha, **search))
    assert_same(lean.search(queries, 10), full.search(queries, 10, mode="approximate"))  # the default mode
    assert_same(lean.search(queries, 10, mode="exact"), full.search(queries, 10, mode="exact"))
    with pytest.raises(ValueError, match="block_maxima=False"):
        lean.search(queries, 10, mode="safe")
    lean.delete(range(0, 1300, 3))
    full.delete(range(0, 1300, 3))
    lean.compact(progress=False)
    full.compact(progress=False)
    assert not lean.block_max.maxima and lean._postings == keep_postings
    assert_same(lean.search(queries, 10), full.search(queries, 10, mode="approximate"))


@pytest.mark.parametrize("keep_postings", [True, False])
def test_without_block_maxima_save_load(tmp_path, keep_postings):
    gen = torch.Generator().manual_seed(22)
    docs = clustered(700, 300, 6, gen)
    queries = queries_for(docs, 30, gen)
    lean = sr.SparseIndex.from_documents(docs[:650], block_max=True, term_lists=LISTS, block_maxima=False,
                                         keep_postings=keep_postings, progress=False)
    lean.add(docs[650:], progress=False)
    lean.save(tmp_path / "x")
    assert struct.unpack_from("<I", (tmp_path / "x").read_bytes(), 8)[0] == 6  # term lists
    loaded = sr.SparseIndex.load(tmp_path / "x")
    assert not loaded.block_max.maxima and loaded._postings == keep_postings and len(loaded) == 700
    for mode in ("approximate", "exact"):
        assert_same(loaded.search(queries, 8, mode=mode), lean.search(queries, 8, mode=mode))
    loaded.optimize(progress=False)  # everything again
    assert loaded.block_max.maxima and loaded._postings
    assert_same(loaded.search(queries, 8, mode="safe"), lean.search(queries, 8, mode="exact"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_term_scales_are_the_kernels(dtype):
    gen = torch.Generator().manual_seed(23)
    docs = clustered(500, 300, 5, gen, dtype=dtype)  # some of the 300 terms hold no posting
    bm = build_block_max(docs, dtype, progress=False)
    assert torch.equal(term_scales(bm.fwd_terms, bm.fwd_weights, 300), bm.scale)
    wide = build_block_max(spread(docs, dim=70000, stride=233), dtype, progress=False)  # int32 terms
    assert torch.equal(term_scales(wide.fwd_terms, wide.fwd_weights, 70000), wide.scale)


def test_block_maxima_false_needs_term_lists():
    docs = clustered(100, 50, 3, torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="needs term lists"):
        sr.SparseIndex.from_documents(docs, block_max=True, block_maxima=False, progress=False)
    with pytest.raises(ValueError, match="block_maxima: needs the block-max structure"):
        sr.SparseIndex.from_documents(docs, block_maxima=False)
    with pytest.raises(TypeError, match="block_maxima"):
        sr.SparseIndex.from_documents(docs, block_max=True, term_lists=True, block_maxima=0, progress=False)
