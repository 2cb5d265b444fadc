"""Property-based tests (hypothesis, fixed budget, derandomized so that CI is reproducible): SparseBatch against
scipy.sparse, every search mode (with and without filters) against the reference, topk against the reference,
damaged index files.
Weights are multiples of 1/4 of modest size, so every sum is exact in float32 and ties are common: results must
equal the reference bit for bit, tie order included."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparse_retrieval as sr
from sparse_retrieval import SparseBatch, reference

BUDGET = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def csr(draw, max_rows=30, max_dim=40, max_nnz=12, nonnegative=False, unsorted=False):
    """(indptr, indices, values, dim) numpy arrays: empty rows, repeated weights; sorted unique columns per row
    unless ``unsorted`` (then shuffled, with repeats)."""
    dim = draw(st.integers(1, max_dim))
    rows = draw(st.integers(0, max_rows))
    low = 0 if nonnegative else -8
    indptr, indices, values = [0], [], []
    for _ in range(rows):
        if unsorted:
            cols = draw(st.lists(st.integers(0, dim - 1), max_size=max_nnz))
        else:
            cols = sorted(draw(st.sets(st.integers(0, dim - 1), max_size=min(max_nnz, dim))))
        indices += cols
        values += [q / 4 for q in draw(st.lists(st.integers(low, 8), min_size=len(cols), max_size=len(cols)))]
        indptr.append(len(indices))
    return (np.array(indptr, np.int64), np.array(indices, np.int64), np.array(values, np.float32), dim)


def batch(arrays, dtype=torch.float32, sort=False):
    indptr, indices, values, dim = arrays
    return SparseBatch(torch.from_numpy(indptr), torch.from_numpy(indices).int(), torch.from_numpy(values).to(dtype),
                       dim, sort=sort)


@BUDGET
@given(csr(unsorted=True), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_sparse_batch_matches_scipy(arrays, dtype):
    indptr, indices, values, dim = arrays
    b = batch(arrays, dtype, sort=True)
    m = sp.csr_matrix((values.astype(np.float64), indices, indptr), shape=(len(indptr) - 1, dim))
    m.sum_duplicates()
    assert b.indptr.tolist() == m.indptr.tolist() and b.indices.tolist() == m.indices.tolist()
    assert b.values.float().tolist() == torch.tensor(m.data).to(dtype).float().tolist()
    np.testing.assert_array_equal(b.to_scipy().toarray(), m.toarray().astype(np.float32))
    if len(b):
        rows = torch.arange(len(b)).flip(0)[::2]
        np.testing.assert_array_equal(b[rows].to_scipy().toarray(), m[rows.numpy()].toarray().astype(np.float32))


@BUDGET
@given(csr(max_rows=60, nonnegative=True), csr(max_rows=8), st.integers(0, 12), st.integers(1, 40),
       st.sampled_from([1, 2, 3, 8]), st.booleans(), st.sampled_from([None, 0.0, 0.3, 0.9]), st.integers(0, 2**31))
def test_every_search_mode_matches_the_reference(docs_arrays, query_arrays, k, segment_size, block_size, add_later,
                                                 filtered, seed):
    docs = batch(docs_arrays)
    indptr, indices, values, _ = query_arrays
    queries = SparseBatch(torch.from_numpy(indptr), torch.from_numpy(indices % docs.dim).int(),
                          torch.from_numpy(values), docs.dim, sort=True)
    allowed = None
    if filtered is not None:  # a filter keeping about that share of the documents
        allowed = torch.rand(len(docs), generator=torch.Generator().manual_seed(seed)) < filtered
    want = reference.sparse_search(queries, docs, k, allowed)
    split = len(docs) // 2 if add_later else len(docs)
    index = sr.SparseIndex(docs.dim, segment_size=segment_size)
    index.add(docs[:split], progress=False)
    index.optimize(block_size=block_size, progress=False)
    index.add(docs[split:], progress=False)  # documents after optimize() live in the exhaustive tail
    for mode in ("exact", "safe"):
        got = index.search(queries, k, threads=2, mode=mode, filter=allowed)
        assert torch.equal(got[1], want[1]), mode
        assert torch.equal(got[0], want[0]), mode
    exact_ids = want[1]
    for alpha in (0.5, 1.0):  # approximate: a subset of the exact scores, ranked the same way
        s, i = index.search(queries, k, threads=1, mode="approximate", alpha=alpha, filter=allowed)
        assert bool((s[:, :-1] >= s[:, 1:]).all()) if k > 1 else True
        if alpha == 1.0:
            assert torch.equal(i, exact_ids)


@BUDGET
@given(st.integers(1, 5), st.integers(1, 300), st.data(), st.booleans(), st.sampled_from(["float32", "float16"]))
def test_topk_matches_the_reference(rows, n, data, largest, dtype):
    k = data.draw(st.integers(0, n))
    pool = data.draw(st.lists(st.sampled_from([0.0, -0.0, 1.0, -2.5, 3.0, 1e-3, float("inf"), float("-inf"),
                                                float("nan")]), min_size=1, max_size=6))
    picks = data.draw(st.lists(st.integers(0, len(pool) - 1), min_size=rows * n, max_size=rows * n))
    x = torch.tensor([pool[p] for p in picks]).reshape(rows, n).to(getattr(torch, dtype))
    got = sr.topk(x, k, largest=largest)
    want = reference.topk(x, k, largest=largest)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], equal_nan=True, rtol=0, atol=0)


@settings(max_examples=120, deadline=None, derandomize=True)
@given(st.data())
def test_damaged_index_files_raise_or_read_back_whole(tmp_path_factory, data):
    """Any flipped byte or truncation: load raises ValueError, or (the damage hit padding) the index searches
    exactly as the saved one. Never a crash or a different result."""
    path = tmp_path_factory.mktemp("damage") / "x.sridx"
    gen = torch.Generator().manual_seed(3)
    docs = SparseBatch.from_dense((torch.rand(40, 25, generator=gen) - 0.6).clamp(min=0))
    queries = SparseBatch.from_dense(torch.rand(3, 25, generator=gen))
    index = sr.SparseIndex.from_documents(docs, progress=False)
    if data.draw(st.booleans()):
        index.optimize(block_size=4, progress=False)
    index.save(path)
    want = index.search(queries, 5)
    raw = bytearray(path.read_bytes())
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    path.write_bytes(bytes(raw))
    for mmap in (True, False):
        try:
            loaded = sr.SparseIndex.load(path, mmap=mmap)
        except ValueError:
            continue
        got = loaded.search(queries, 5)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
