import concurrent.futures
import os
import subprocess
import time

import numpy as np
import pytest
import torch

import sparse_retrieval as sr
from sparse_retrieval import reference
from sparse_retrieval.sparse import SparseBatch

from conftest import build_emulation
from test_sparse_dot import random_batch

ops = torch.ops.sparse_retrieval


def check_search(index, queries, docs, k, threads, exact):
    """Compares index.search with reference.sparse_search. With `exact` (small-integer values, so every sum is
    exact in float32) ids must match one for one, ties included; otherwise scores match to rounding and every
    returned id really has its returned score."""
    scores, ids = index.search(queries, k, threads=threads)
    want_scores, want_ids = reference.sparse_search(queries, docs, k)
    assert scores.shape == ids.shape == (len(queries), k) and ids.dtype == torch.int64
    if exact:
        assert torch.equal(ids, want_ids)
        assert torch.equal(scores, want_scores)
        return
    torch.testing.assert_close(scores, want_scores, rtol=1e-4, atol=1e-4)
    full = reference.sparse_dot(queries, docs)
    real = ids >= 0
    got = torch.gather(full, 1, ids.clamp(min=0))
    torch.testing.assert_close(got[real], scores[real], rtol=1e-4, atol=1e-4)
    assert torch.equal(real, want_ids >= 0)


@pytest.mark.parametrize("k", [1, 7, 150])
@pytest.mark.parametrize("threads", [1, 3])
def test_search_matches_reference_with_ties(simd, k, threads):
    gen = torch.Generator().manual_seed(k + threads)
    docs = random_batch(131, 57, 30, gen, integer=True)
    queries = random_batch(9, 57, 20, gen, integer=True)
    index = sr.SparseIndex.from_documents(docs)
    check_search(index, queries, docs, k, threads, exact=True)
    check_search(index, queries[:1], docs, k, threads, exact=True)  # one query over split document ranges


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_search_float_values(simd, dtype):
    gen = torch.Generator().manual_seed(11)
    docs = random_batch(300, 200, 40, gen, dtype)
    queries = random_batch(12, 200, 25, gen, dtype)
    index = sr.SparseIndex.from_documents(docs)
    assert index.dtype == dtype
    check_search(index, queries, docs, 10, 2, exact=False)


@pytest.fixture(scope="module")
def long_segment():
    """An index whose first segment is longer than one accumulator block (2^20 documents), float16 weights, with
    its queries and their reference top 20. Rounded weights make many exact ties. Built once: it takes seconds."""
    gen = torch.Generator().manual_seed(3)
    n = 1_200_000  # three columns per document, one in each third of the 64 dimensions: distinct and sorted
    cols = torch.randint(0, 21, (n, 1), generator=gen) + torch.tensor([0, 21, 42])
    values = torch.randint(-1, 4, (3 * n,), generator=gen).to(torch.float16)
    docs = SparseBatch(torch.arange(0, 3 * n + 1, 3), cols.flatten().int(), values, 64, check=False)
    queries = random_batch(6, 64, 8, gen, integer=True)
    index = sr.SparseIndex(64, torch.float16, segment_size=1_100_000)
    index.add(docs[:9_000], progress=False)
    index.add(docs[9_000:], progress=False)
    assert len(index) == 1_200_000 and [s.ndocs for s in index._segments] == [1_100_000, 100_000]
    return index, queries, reference.sparse_search(queries, docs, 20)


def test_search_spans_blocks_and_segments(simd, long_segment):
    # Ids must match the reference one for one; a single query is split over four document ranges (one straddling
    # the segment boundary) whose candidates are merged.
    index, queries, (want_scores, want_ids) = long_segment
    for threads in (1, 4):
        for n in (len(queries), 1):
            scores, ids = index.search(queries[:n], 20, threads=threads)
            assert torch.equal(ids, want_ids[:n]) and torch.equal(scores, want_scores[:n])


def test_add_continues_ids_and_merges_segments():
    gen = torch.Generator().manual_seed(13)
    docs = random_batch(60, 40, 10, gen, integer=True)
    queries = random_batch(5, 40, 8, gen, integer=True)
    index = sr.SparseIndex(40, segment_size=25)
    for part in (docs[:3], docs[3:4], docs[4:33], docs[33:]):
        index.add(part)
    assert len(index) == 60 and [s.ndocs for s in index._segments] == [25, 25, 10]
    check_search(index, queries, docs, 60, 2, exact=True)
    whole = sr.SparseIndex.from_documents(docs)
    for a, b in zip(index.search(queries, 9), whole.search(queries, 9)):
        assert torch.equal(a, b)


def test_edge_cases(simd):
    dim = 20
    docs = SparseBatch.from_lists([([], []), ([2, 5], [1.0, 2.0]), ([], []), ([7], [3.0])], dim)
    index = sr.SparseIndex.from_documents(docs)
    queries = SparseBatch.from_lists([([], []), ([10, 11], [1.0, 1.0]), ([5, 7], [1.0, -1.0])], dim)
    scores, ids = index.search(queries, 6)
    # Empty and disjoint queries score every document 0: ids in order, then padding.
    assert ids[0].tolist() == [0, 1, 2, 3, -1, -1] == ids[1].tolist()
    assert scores[0, :4].eq(0).all() and scores[0, 4:].eq(-float("inf")).all()
    assert ids[2].tolist() == [1, 0, 2, 3, -1, -1] and scores[2, :4].tolist() == [2.0, 0.0, 0.0, -3.0]
    assert index.search(queries, 0)[0].shape == (3, 0)
    assert index.search(SparseBatch.from_lists([], dim), 3)[1].shape == (0, 3)
    empty = sr.SparseIndex(dim)
    s, i = empty.search(queries, 2)
    assert i.eq(-1).all() and s.eq(-float("inf")).all()


def test_bad_inputs():
    docs = SparseBatch.from_lists([([1], [1.0])], 10)
    index = sr.SparseIndex.from_documents(docs)
    with pytest.raises(ValueError, match="beyond the index's dim"):
        index.search(SparseBatch.from_lists([([12], [1.0])], 13), 1)
    with pytest.raises(ValueError, match="k: expected"):
        index.search(docs, -1)
    with pytest.raises(ValueError, match="threads"):
        index.search(docs, 1, threads=0)
    with pytest.raises(TypeError, match="queries: expected a SparseBatch, a torch sparse"):
        index.search([[1.0]], 1)
    with pytest.raises(ValueError, match="dim 11 differs"):
        index.add(SparseBatch.from_lists([([1], [1.0])], 11))
    with pytest.raises(IndexError, match="q_indices"):  # the op itself guards memory
        ops.sparse_search(docs.indptr, torch.tensor([10], dtype=torch.int32), docs.values,
                          [s.ptr for s in index._segments], [s.docs for s in index._segments],
                          [s.weights for s in index._segments], [1], 1, 1)


def test_raw_ops_refuse_what_the_kernels_cannot_define():
    """None for a tensor, a k that no output could hold, an empty offsets table, a document with a repeated term
    (its posting list would name it twice), and the same range checks in the fakes (meta tensors)."""
    docs = SparseBatch.from_lists([([1], [1.0]), ([2, 4], [1.0, 2.0])], 6)
    index = sr.SparseIndex.from_documents(docs, progress=False)
    segs = index._segments
    with pytest.raises(ValueError, match=r"k: must lie in \[0, 2\^31\)"):
        raw_search(docs, segs, k=2**31)
    with pytest.raises(ValueError, match=r"k: must lie in \[0, 2\^31\)"):
        raw_search(docs, segs, k=-1)
    with pytest.raises(ValueError, match="num_threads: must be >= 0"):  # as block_search (0: all threads)
        ops.sparse_search(docs.indptr, docs.indices, docs.values, [segs[0].ptr], [segs[0].docs], [segs[0].weights],
                          [2], 3, -1)
    with pytest.raises(TypeError, match="q_values: expected a tensor, got None"):
        ops.sparse_search(docs.indptr, docs.indices, None, [segs[0].ptr], [segs[0].docs], [segs[0].weights], [2], 3,
                          1)
    with pytest.raises(ValueError, match="ptrs\\[0\\]: expected dim \\+ 1 >= 1 entries"):
        ops.sparse_search(docs.indptr, docs.indices, docs.values, [torch.zeros(0, dtype=torch.int64)],
                          [segs[0].docs], [segs[0].weights], [2], 3, 1)
    with pytest.raises(ValueError, match="docs_indices: column indices repeated within row 1"):
        ops.build_postings(docs.indptr, torch.tensor([1, 2, 2]), docs.values, 6)
    with pytest.raises(TypeError, match="docs_values: expected a tensor, got None"):
        ops.build_postings(docs.indptr, docs.indices, None, 6)
    meta = [t.to("meta") for t in (docs.indptr, docs.indices, docs.values)]
    with pytest.raises(ValueError, match="k: must lie in"):
        ops.sparse_search(*meta, [segs[0].ptr.to("meta")], [segs[0].docs.to("meta")], [segs[0].weights.to("meta")],
                          [2], -3, 1)
    with pytest.raises(ValueError, match="dim: must lie in"):
        ops.build_postings(*meta, -5)


def raw_search(queries, segs, k=3, sizes=None):
    return ops.sparse_search(queries.indptr, queries.indices, queries.values, [s.ptr for s in segs],
                             [s.docs for s in segs], [s.weights for s in segs],
                             sizes or [s.ndocs for s in segs], k, 1)


@pytest.mark.parametrize("damage, match", [
    (lambda p, d: d.__setitem__(0, -1), "docs\\[0\\]: list"),           # negative id
    (lambda p, d: d.__setitem__(-1, 10**6), "docs\\[0\\]: list"),       # id >= the segment's documents
    (lambda p, d: d.__setitem__(slice(0, 2), torch.tensor([5, 3])), "docs\\[0\\]: list"),  # unsorted
    (lambda p, d: d.__setitem__(1, d[0]), "docs\\[0\\]: list"),         # repeated
    (lambda p, d: p.__setitem__(5, 10**9), "ptrs\\[0\\]: offsets"),     # inner offset past nnz
    (lambda p, d: p.__setitem__(5, -3), "ptrs\\[0\\]: offsets"),        # negative offset
    (lambda p, d: p.__setitem__(5, p[4] - 1), "ptrs\\[0\\]: offsets"),  # decreasing
])
def test_raw_search_checks_posting_contents(damage, match):
    """The raw op checks what it reads: crafted postings raise, naming the argument (never a crash)."""
    gen = torch.Generator().manual_seed(21)
    docs = random_batch(40, 12, 6, gen)
    index = sr.SparseIndex.from_documents(docs, progress=False)
    seg = index._segments[0]
    queries = SparseBatch.from_lists([(list(range(12)), [1.0] * 12)], 12)
    raw_search(queries, [seg])
    # Changed through torch (the version counter moves): checked again before the next search.
    ptr, ids = seg.ptr.clone(), seg.docs.clone()
    assert ptr[4] < ptr[5] < ptr[6] and ids.numel() > 2
    damage(ptr, ids)
    with pytest.raises((ValueError, IndexError), match=match):
        raw_search(queries, [sr.index._Segment(ptr, ids, seg.weights, seg.ndocs)])
    damage(seg.ptr, seg.docs)  # in place, on tensors that passed a check before
    with pytest.raises((ValueError, IndexError), match=match):
        raw_search(queries, [seg])


def test_raw_search_survives_changes_behind_torchs_back():
    """Writes through a numpy view do not move the version counter: the kernel's own bounds turn them into an
    error instead of a stray memory access."""
    gen = torch.Generator().manual_seed(22)
    docs = random_batch(300, 30, 10, gen)
    queries = SparseBatch.from_lists([(list(range(30)), [1.0] * 30)], 30)
    for where, value in (("docs", -7), ("docs", 2**30), ("ptr", 10**12), ("ptr", -5)):
        index = sr.SparseIndex.from_documents(docs, progress=False)
        seg = index._segments[0]
        want = raw_search(queries, [seg])
        arr = (seg.docs if where == "docs" else seg.ptr).numpy()
        arr[len(arr) // 2] = value
        with pytest.raises(ValueError, match="changed after it was checked"):
            raw_search(queries, [seg])
        assert want[1].ge(0).all()


def test_queries_in_any_format():
    """torch sparse CSR/COO, dense tensors (2-D and one 1-D vector), numpy and scipy give what the SparseBatch
    gives."""
    import scipy.sparse as sp

    gen = torch.Generator().manual_seed(25)
    docs = random_batch(90, 40, 10, gen)
    queries = random_batch(5, 40, 8, gen)
    index = sr.SparseIndex.from_documents(docs, progress=False)
    want = index.search(queries, 6)
    dense = queries.to_dense()
    formats = {"dense": dense, "csr": dense.to_sparse_csr(), "coo": dense.to_sparse(), "numpy": dense.numpy(),
               "float64": dense.double(), "scipy": sp.csr_matrix(dense.numpy()),
               "scipy coo": sp.coo_matrix(dense.double().numpy())}
    for name, q in formats.items():
        got = index.search(q, 6)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), name
    for one in (dense[2], dense[2].to_sparse()):  # a 1-D COO: sentence-transformers' encode of one text
        got = index.search(one, 6)
        assert torch.equal(got[1], want[1][2:3]) and torch.equal(got[0], want[0][2:3])
    with pytest.raises(ValueError, match="1-D .* or 2-D"):
        index.search(dense[None], 6)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        index.search(dense.long(), 6)
    # errors of the conversions name the caller's argument
    with pytest.raises(ValueError, match="^queries: contains NaN or Inf"):
        index.search(dense.masked_fill(dense != 0, float("nan")), 6)
    with pytest.raises(ValueError, match="^queries: expected 2 dimensions"):
        index.search(dense[None].to_sparse(), 6)
    with pytest.raises(ValueError, match="^docs: contains NaN or Inf"):
        sr.SparseIndex.from_documents(dense.masked_fill(dense != 0, float("inf")))


@pytest.mark.parametrize("simd_level", ["scalar", "avx2", "avx512"])
def test_filters_and_deletes_match_the_reference(simd_level, tmp_path):
    """Filters and tombstones act inside every kernel: k allowed documents come back whenever k exist, in every
    mode, with documents added after optimize(), after save/load; exact scores and ties as the reference's."""
    if simd_level not in sr.supported_simd_levels():
        pytest.skip(f"{simd_level} not supported here")
    gen = torch.Generator().manual_seed(26)
    docs = random_batch(230, 40, 10, gen)
    docs = SparseBatch(docs.indptr, docs.indices, docs.values.abs().round(decimals=1), 40)
    queries = random_batch(14, 40, 8, gen)
    index = sr.SparseIndex.from_documents(docs[:200], block_max=True, block_size=4, progress=False)
    index.add(docs[200:], progress=False)
    deleted = torch.randperm(230, generator=gen)[:40]
    index.delete(deleted)
    index.delete(deleted[:3])  # twice: no change
    assert index.ndeleted == 40
    alive = torch.ones(230, dtype=torch.bool)
    alive[deleted] = False
    few = torch.tensor([3, 17, 200, 229, 5])
    filters = {"none": None, "mask": torch.rand(230, generator=gen) < 0.3, "ids": few, "list": few.tolist(),
               "set": set(few.tolist()), "numpy": few.numpy(), "empty": []}
    with sr.simd_level(simd_level):
        for name, f in filters.items():
            allowed = alive.clone()
            if f is not None:
                chosen = torch.zeros(230, dtype=torch.bool)
                chosen[torch.as_tensor(list(f) if isinstance(f, set) else f, dtype=torch.long) if
                       not isinstance(f, torch.Tensor) or f.dtype != torch.bool else f.nonzero().flatten()] = True
                allowed &= chosen
            for k in (1, 7, 60):
                want = reference.sparse_search(queries, docs, k, allowed)
                for mode in ("exact", "safe"):
                    got = index.search(queries, k, mode=mode, filter=f)
                    assert torch.equal(got[1], want[1]), (name, k, mode)
                    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
                got = index.search(queries, k, mode="approximate", alpha=0.5, filter=f)
                returned = got[1][got[1] >= 0]
                assert bool(allowed[returned].all()), (name, k)
    path = tmp_path / "x.sridx"
    index.save(path)
    loaded = sr.SparseIndex.load(path)
    assert loaded.ndeleted == 40
    want = reference.sparse_search(queries, docs, 9, alive)
    got = loaded.search(queries, 9)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one entry per document"):
        index.search(queries, 3, filter=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="filter: document ids must lie"):
        index.search(queries, 3, filter=[230])
    with pytest.raises(TypeError, match="filter: expected integer ids"):
        index.search(queries, 3, filter=torch.ones(230))
    with pytest.raises(TypeError, match="filter: uint8 is ambiguous"):  # a numpy-style 0/1 mask, not ids 0 and 1
        index.search(queries, 3, filter=torch.ones(230, dtype=torch.uint8))
    with pytest.raises(ValueError, match="filter: expected a 1-D collection"):
        index.search(queries, 3, filter=torch.tensor([[1, 2]]))
    with pytest.raises(TypeError, match="filter: expected ids as an int or a list"):
        index.search(queries, 3, filter=(i for i in [1, 2]))
    as_list = [bool(b) for b in (torch.arange(230) % 3 == 0)]  # a Python list of bools is a mask too
    assert all(torch.equal(a, b) for a, b in zip(index.search(queries, 3, filter=as_list),
                                                 index.search(queries, 3, filter=torch.tensor(as_list))))
    with pytest.raises(ValueError, match="ids: document ids must lie"):
        index.delete([-1])
    for bad in (np.array([True, False]), [2.7], torch.tensor([1.0])):  # never cast into ids
        with pytest.raises(TypeError, match="ids: expected integer ids"):
            index.delete(bad)
    assert index.ndeleted == 40
    with pytest.raises(ValueError, match="allowed: expected a contiguous 1-D mask"):
        segs = index._segments
        ops.sparse_search(queries.indptr, queries.indices, queries.values, [s.ptr for s in segs],
                          [s.docs for s in segs], [s.weights for s in segs], [s.ndocs for s in segs], 3, 1,
                          torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("kind", ["int", "str"])
def test_external_ids(kind, tmp_path):
    """Documents keyed by user ids: search returns them, delete and filter take them, save/load keeps them."""
    gen = torch.Generator().manual_seed(27)
    docs = random_batch(120, 30, 8, gen)
    docs = SparseBatch(docs.indptr, docs.indices, docs.values.abs(), 30)
    queries = random_batch(6, 30, 6, gen)
    user = (torch.randperm(10**6, generator=gen)[:120] * 7 + 3) if kind == "int" else \
        [f"doc-{i:03d}-é" for i in torch.randperm(120, generator=gen).tolist()]

    def to_user(pos):
        if kind == "int":
            return torch.where(pos >= 0, user[pos.clamp(min=0)], -1)
        return np.array([[user[p] if p >= 0 else None for p in row] for row in pos.tolist()], dtype=object)

    def same(a, b):
        assert (torch.equal(a, b) if kind == "int" else (a == b).all()), (a, b)

    index = sr.SparseIndex.from_documents(docs[:100], ids=user[:100], block_max=True, progress=False)
    index.add(docs[100:], ids=user[100:], progress=False)
    plain = sr.SparseIndex.from_documents(docs, progress=False)
    for mode in ("exact", "safe"):
        got, want = index.search(queries, 8, mode=mode), plain.search(queries, 8)
        assert torch.equal(got[0], want[0])
        same(got[1], to_user(want[1]))
    index.delete(user[5:25])
    plain.delete(list(range(5, 25)))
    keep = user[40:90]
    got = index.search(queries, 130, filter=keep)
    want = plain.search(queries, 130, filter=range(40, 90))
    same(got[1], to_user(want[1]))
    path = tmp_path / "x.sridx"
    index.save(path)
    loaded = sr.SparseIndex.load(path, mmap=False)
    got = loaded.search(queries, 130, filter=keep)
    same(got[1], to_user(want[1]))
    assert loaded.ndeleted == 20
    with pytest.raises(ValueError, match="unique"):
        index.add(docs[:1], ids=user[:1])
    copy = index.to("cpu")  # shares nothing that a later add changes
    index.add(docs[:1], ids=[10**7] if kind == "int" else ["new"], progress=False)
    copy.add(docs[:1], ids=[10**7] if kind == "int" else ["new"], progress=False)
    assert len(copy) == len(index) == 121
    empty = sr.SparseIndex(30)
    with pytest.raises(ValueError, match="unique"):
        empty.add(docs[:2], ids=[5, 5] if kind == "int" else ["a", "a"])
    empty.add(docs[:2], progress=False)  # the failed add left it without ids
    with pytest.raises(ValueError, match="pass one per document"):
        index.add(docs[:1])
    with pytest.raises(ValueError, match="filter: unknown ids"):
        index.search(queries, 3, filter=[10**9] if kind == "int" else ["nope"])
    with pytest.raises(ValueError, match="ids: unknown ids"):
        index.delete([10**9] if kind == "int" else ["nope"])
    with pytest.raises(ValueError, match="already holds documents without ids"):
        plain.add(docs[:1], ids=user[:1])
    if kind == "int":
        with pytest.raises(ValueError, match="must be >= 0"):
            sr.SparseIndex.from_documents(docs[:2], ids=[4, -2], progress=False)
        with pytest.raises(ValueError, match="expected 2 ids"):
            sr.SparseIndex.from_documents(docs[:2], ids=[4], progress=False)
        with pytest.raises(TypeError, match="ids are ints"):
            index.add(docs[:1], ids=["x"])


@pytest.mark.parametrize("user_ids", [False, True])
def test_compact_drops_deleted_documents_and_keeps_ids(user_ids, tmp_path):
    gen = torch.Generator().manual_seed(28)
    docs = random_batch(150, 30, 8, gen)
    docs = SparseBatch(docs.indptr, docs.indices, docs.values.abs(), 30)
    queries = random_batch(5, 30, 6, gen)
    ids = torch.arange(150) * 3 + 1 if user_ids else None
    index = sr.SparseIndex.from_documents(docs[:120], ids=None if ids is None else ids[:120], block_max=True,
                                          block_size=4, progress=False)
    index.add(docs[120:], ids=None if ids is None else ids[120:], progress=False)
    gone = torch.randperm(150, generator=gen)[:50]
    index.delete(gone if ids is None else ids[gone])
    before = {mode: index.search(queries, 20, mode=mode) for mode in ("exact", "safe")}
    postings = index.nnz
    index.compact(progress=False)
    assert index.ndeleted == 0 and index.nnz < postings and len(index) == 100
    for mode, want in before.items():
        got = index.search(queries, 20, mode=mode)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), mode
    more = random_batch(10, 30, 8, gen)
    more = SparseBatch(more.indptr, more.indices, more.values.abs(), 30)
    if ids is None:
        index.add(more, progress=False)  # ids continue after the largest ever given
        with pytest.raises(ValueError, match="assigns its own ids"):
            index.add(more, ids=list(range(10)))
    else:
        index.add(more, ids=torch.arange(10) + 10**6, progress=False)
    first_new = 150 if ids is None else 10**6
    assert index.search(more[:1], 1, filter=[first_new])[1].tolist() == [[first_new]]
    assert len(index) == 110
    index.save(tmp_path / "x.sridx")
    loaded = sr.SparseIndex.load(tmp_path / "x.sridx")
    for a, b in zip(loaded.search(queries, 20), index.search(queries, 20)):
        assert torch.equal(a, b)


def test_documents_are_rebuilt_from_the_postings():
    """The rebuild behind optimize(), compact() and a loaded tail: any document range over several segments."""
    gen = torch.Generator().manual_seed(29)
    docs = random_batch(75, 20, 7, gen)
    index = sr.SparseIndex(20, segment_size=16)
    index.add(docs, progress=False)
    for lo, hi in ((0, 75), (0, 16), (3, 40), (16, 32), (70, 75), (10, 10)):
        got = index._documents(lo, hi)
        want = docs[lo:hi]
        assert torch.equal(got.indptr, want.indptr) and torch.equal(got.indices.long(), want.indices.long())
        assert torch.equal(got.values, want.values)


def test_memory_per_posting():
    docs, _ = sr.datasets.synthetic_splade(2000, 0, dim=3000, seed=1)
    for dtype, per in ((torch.float32, 8), (torch.float16, 6)):
        index = sr.SparseIndex.from_documents(docs, dtype)
        assert index.nbytes == per * docs.nnz + 8 * (docs.dim + 1)


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip(tmp_path, mmap, dtype):
    gen = torch.Generator().manual_seed(14)
    docs = random_batch(70, 30, 12, gen, dtype)
    queries = random_batch(6, 30, 8, gen, dtype)
    index = sr.SparseIndex(30, dtype, segment_size=32)
    index.add(docs)
    path = tmp_path / "x.sridx"
    index.save(path)
    loaded = sr.SparseIndex.load(path, mmap=mmap)
    assert (len(loaded), loaded.dim, loaded.dtype, loaded.nbytes) == (70, 30, dtype, index.nbytes)
    for a, b in zip(index.search(queries, 8), loaded.search(queries, 8)):
        assert torch.equal(a, b)
    assert os.listdir(tmp_path) == ["x.sridx"]


def test_corrupted_files_raise(tmp_path):
    gen = torch.Generator().manual_seed(15)
    index = sr.SparseIndex.from_documents(random_batch(50, 30, 12, gen))
    path = tmp_path / "x.sridx"
    index.save(path)
    data = path.read_bytes()
    for cut in (10, 100, len(data) - 3):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated|magic|checksum"):
            sr.SparseIndex.load(path)
    for pos in (20, 70, len(data) // 2, len(data) - 1):
        flipped = bytearray(data)
        flipped[pos] ^= 0x10
        path.write_bytes(bytes(flipped))
        with pytest.raises(ValueError, match="checksum|version|dtype"):
            sr.SparseIndex.load(path)


def test_failed_save_leaves_old_file(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(16)
    old = sr.SparseIndex.from_documents(random_batch(10, 30, 5, gen))
    path = tmp_path / "x.sridx"
    old.save(path)
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("crash before rename")))
    with pytest.raises(OSError):
        sr.SparseIndex.from_documents(random_batch(20, 30, 5, gen)).save(path)
    monkeypatch.undo()
    assert len(sr.SparseIndex.load(path)) == 10 and os.listdir(tmp_path) == ["x.sridx"]


def test_concurrent_searches():
    gen = torch.Generator().manual_seed(17)
    docs = random_batch(400, 100, 30, gen)
    index = sr.SparseIndex.from_documents(docs)
    batches = [random_batch(5, 100, 20, gen) for _ in range(8)]
    serial = [index.search(q, 10, threads=2) for q in batches]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda q: index.search(q, 10, threads=2), batches * 3))
    for (a, b), (c, d) in zip(serial * 3, parallel):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_add_and_optimize_during_searches():
    """Writers publish whole: every concurrent search sees the index before or after each add, never between."""
    gen = torch.Generator().manual_seed(23)
    parts = [random_batch(150, 60, 12, gen) for _ in range(6)]
    parts = [SparseBatch(p.indptr, p.indices, p.values.abs(), 60) for p in parts]  # block maxima need w >= 0
    queries = random_batch(12, 60, 8, gen)
    index = sr.SparseIndex(60, segment_size=200)  # adds merge into and split segments
    index.add(parts[0], progress=False)
    index.optimize(progress=False)
    expected = []  # exact results after each prefix of the adds
    for n in range(1, len(parts) + 1):
        expected.append(sr.SparseIndex.from_documents(SparseBatch.cat(parts[:n]), progress=False).search(queries, 7))
    seen = []

    def reader(mode):
        for _ in range(60):
            seen.append(index.search(queries, 7, threads=1, mode=mode))

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        readers = [pool.submit(reader, m) for m in ("exact", "safe")]
        for part in parts[1:]:
            index.add(part, progress=False)
        index.optimize(progress=False)
        for r in readers:
            r.result()
    for scores, ids in seen:
        assert any(torch.equal(ids, e[1]) and torch.equal(scores, e[0]) for e in expected)


def test_mmap_index_refuses_a_file_changed_in_place(tmp_path):
    gen = torch.Generator().manual_seed(24)
    docs, queries = random_batch(80, 30, 10, gen), random_batch(4, 30, 6, gen)
    index = sr.SparseIndex.from_documents(docs, progress=False)
    path = tmp_path / "x.sridx"
    index.save(path)
    loaded = sr.SparseIndex.load(path)
    want = loaded.search(queries, 5)
    index.save(path)  # replaced by rename: the mapped file is untouched
    copy = loaded.to("cpu")
    for a, b in zip(want, copy.search(queries, 5)):
        assert torch.equal(a, b)
    del loaded  # the copy keeps its own handle on the mapped file
    reloaded = sr.SparseIndex.load(path)
    reloaded.search(queries, 5)  # contents checked: from now on only the file's size and time tell a change
    time.sleep(0.05)  # file times tick in steps of a few milliseconds
    with open(path, "r+b") as f:  # edited in place
        f.seek(200)
        f.write(b"\xff" * 64)
    for stale in (reloaded, reloaded.to("cpu")):
        with pytest.raises(ValueError, match="changed on disk"):
            stale.search(queries, 5)
    for a, b in zip(want, copy.search(queries, 5)):
        assert torch.equal(a, b)


def test_opcheck():
    gen = torch.Generator().manual_seed(18)
    docs = random_batch(20, 30, 10, gen)
    queries = random_batch(4, 30, 6, gen)
    torch.library.opcheck(ops.build_postings.default, (docs.indptr, docs.indices, docs.values, 30))
    ptr, ids, w = ops.build_postings(docs.indptr, docs.indices, docs.values, 30)
    torch.library.opcheck(ops.sparse_search.default,
                          (queries.indptr, queries.indices, queries.values, [ptr], [ids], [w], [20], 5, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_search(dtype):
    gen = torch.Generator().manual_seed(19)
    docs = random_batch(5000, 300, 30, gen, dtype, integer=True)
    queries = random_batch(70, 300, 20, gen, dtype, integer=True)
    index = sr.SparseIndex(300, dtype, segment_size=3000)
    index.add(docs)
    gpu = index.to("cuda")
    for k in (1, 10, 100):
        scores, ids = gpu.search(queries.cuda(), k)
        want_scores, want_ids = reference.sparse_search(queries, docs, k)
        assert torch.equal(ids.cpu(), want_ids) and torch.equal(scores.cpu(), want_scores)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_search_one_launch(monkeypatch, dtype):
    """SPARSE_RETRIEVAL_SEARCH_ONE_LAUNCH=1: the query's last block merges the candidates (one launch); more than
    kMaxSegments segments or k > kMaxMergeK fall back to the merge by torch."""
    monkeypatch.setenv("SPARSE_RETRIEVAL_SEARCH_ONE_LAUNCH", "1")
    gen = torch.Generator().manual_seed(23)
    docs = random_batch(20_000, 500, 30, gen, dtype, integer=True)
    queries = random_batch(40, 500, 20, gen, dtype, integer=True)
    for segment_size in (7000, 500):  # 3 segments; 40 (two launches)
        index = sr.SparseIndex(500, dtype, segment_size=segment_size)
        index.add(docs)
        gpu = index.to("cuda")
        for k in (1, 10, 1000, 3000):
            scores, ids = gpu.search(queries.cuda(), k)
            want_scores, want_ids = reference.sparse_search(queries, docs, k)
            assert torch.equal(ids.cpu(), want_ids) and torch.equal(scores.cpu(), want_scores)


# ---- host emulation of the CUDA search -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def search_emulation(tmp_path_factory):
    """tests/search_emulation.cpp: the CUDA search's block code (search_chunk.h), every block and every phase in
    a random order."""
    return build_emulation(tmp_path_factory, "search_emulation.cpp", "kernels/cuda/search_chunk.h")


def emulate_search(exe, queries, segments, k, one_launch, seed=0):
    """Scores and ids of the emulated CUDA search of `queries` over `segments` (SparseBatch each, in id order),
    and whether the kernel merged them (one launch)."""
    data = []
    for seg in segments:
        ptr, ids, w = ops.build_postings(seg.indptr, seg.indices, seg.values, seg.dim)
        data += [np.array([len(seg), ptr.numel() - 1], np.int64), ptr.numpy(), ids.numpy().astype(np.int32),
                 w.float().numpy()]
    data += [queries.indptr.numpy().astype(np.int64), queries.indices.numpy().astype(np.int64),
             queries.values.float().numpy()]
    nq = len(queries)
    run = subprocess.run([str(exe), *map(str, (len(segments), nq, k, int(one_launch), seed))],
                         input=b"".join(a.tobytes() for a in data), capture_output=True)
    assert run.returncode == 0, run.stderr.decode()
    out = bytearray(run.stdout)
    scores = torch.frombuffer(out[:4 * nq * k], dtype=torch.float32).reshape(nq, k)
    ids = torch.frombuffer(out[4 * nq * k:], dtype=torch.int64).reshape(nq, k)
    return scores, ids, run.stderr.strip() == b"merged"


def test_search_emulation(search_emulation):
    """Chunks of 4,096 documents (segments shorter and longer than one, empty ones, and 40 segments: two launches),
    k from 1 past the number of documents (padding), a query longer than a block (two tiles of terms), ties among
    integer scores (lower id first), empty queries; in one launch (the last block merges, in tiles when k and the
    candidates exceed one chunk's buffer) and with the candidates merged outside."""
    gen = torch.Generator().manual_seed(29)
    dim = 700
    docs = random_batch(9_000, dim, 12, gen, integer=True)
    queries = random_batch(6, dim, 40, gen, integer=True)
    long_query = SparseBatch.from_lists([(torch.arange(0, dim, 1), torch.ones(dim))], dim)
    cases = [([4096, 5000 - 4096, 0, 4000], (1, 10, 600, 9_001)), ([9_000], (1, 2048, 2049)),
             ([225] * 40, (5, 300))]
    for i, (cut, ks) in enumerate(cases):
        bounds = np.cumsum([0] + cut)
        segments = [docs[int(a):int(b)] for a, b in zip(bounds[:-1], bounds[1:])]
        for qs in (queries, long_query):
            for k in ks:
                want_scores, want_ids = reference.sparse_search(qs, docs, k)
                for one_launch in (False, True):
                    scores, ids, merged = emulate_search(search_emulation, qs, segments, k, one_launch, seed=k + i)
                    assert merged == (one_launch and len(cut) - cut.count(0) <= 32 and k <= 2048)
                    assert torch.equal(ids, want_ids) and torch.equal(scores, want_scores), (cut, k, one_launch)
    # Only the first chunk scores above 0: once the merge holds k, later windows add nothing (no sort).
    rows = [(torch.tensor([i % 7, 7]), torch.tensor([1.0, 5.0])) if i < 50 else (torch.tensor([i % 7]), torch.ones(1))
            for i in range(9_000)]
    docs = SparseBatch.from_lists(rows, 8)
    query = SparseBatch.from_lists([(torch.tensor([7]), torch.ones(1))], 8)
    want_scores, want_ids = reference.sparse_search(query, docs, 300)
    scores, ids, merged = emulate_search(search_emulation, query, [docs[i:i + 300] for i in range(0, 9_000, 300)],
                                         300, True)
    assert merged and torch.equal(ids, want_ids) and torch.equal(scores, want_scores)


def test_concurrent_saves_leave_a_whole_index_and_stale_temporaries_go(tmp_path):
    gen = torch.Generator().manual_seed(31)
    indexes = [sr.SparseIndex.from_documents(random_batch(40 + 10 * i, 30, 6, gen)) for i in range(4)]
    path = tmp_path / "x.sridx"
    for _ in range(10):
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda ix: ix.save(path), indexes))
        assert len(sr.SparseIndex.load(path)) in {len(ix) for ix in indexes}
    dead = tmp_path / ".x.sridx.tmp-999999999-1-abcd"  # no process has this pid
    dead.write_bytes(b"half a save")
    other = tmp_path / ".x.sridx.tmp-notapid"
    other.write_bytes(b"not ours")
    indexes[0].save(path)
    assert not dead.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".x.sridx.tmp-notapid", "x.sridx"]


def test_size_arguments_are_checked():
    import numpy as np

    gen = torch.Generator().manual_seed(32)
    docs = random_batch(30, 20, 5, gen)
    index = sr.SparseIndex.from_documents(docs)
    assert sr.SparseIndex(np.int64(4)).dim == 4
    for k in (2**64, 2**31, -1, 1.5):
        with pytest.raises(ValueError, match="k"):
            index.search(docs[:2], k)
    want = index.search(docs[:3], 4, threads=1)
    for threads in (2**63 - 1, np.int64(3)):
        got = index.search(docs[:3], 4, threads=threads)
        assert torch.equal(got[1], want[1])
    segs = index._segments
    got = ops.sparse_search(docs[:3].indptr, docs[:3].indices, docs[:3].values, [s.ptr for s in segs],
                            [s.docs for s in segs], [s.weights for s in segs], [s.ndocs for s in segs], 4, 2**63 - 1)
    assert torch.equal(got[1], want[1])
