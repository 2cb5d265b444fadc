"""SparseBatch: construction, conversions, row selection and validation, checked against scipy.sparse."""
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import sparse_retrieval as sr
from sparse_retrieval import SparseBatch

VALUE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INDEX_DTYPES = [torch.int32, torch.int64]


def random_csr(n, dim, density=0.2, seed=0, empty_rows=(0, 3), dtype=np.float32):
    """A random CSR matrix with some rows emptied, values exactly representable in bfloat16/float16."""
    rng = np.random.default_rng(seed)
    m = sp.random(n, dim, density=density, format="csr", random_state=rng, dtype=np.float64)
    m.data = np.round(rng.uniform(-4, 4, m.nnz) * 8) / 8  # multiples of 1/8: exact in all value dtypes
    m.data[m.data == 0] = 0.5
    for r in empty_rows:
        if r < n:
            m.data[m.indptr[r]:m.indptr[r + 1]] = 0
    m.eliminate_zeros()
    m.sort_indices()
    return m.astype(dtype)


def assert_matches(b: SparseBatch, m):
    """b holds exactly the entries of the scipy matrix m, in canonical CSR form."""
    m = sp.csr_matrix(m)
    m.sum_duplicates()
    assert b.shape == m.shape
    assert b.indptr.dtype == torch.int64
    np.testing.assert_array_equal(b.indptr.cpu().numpy(), m.indptr)
    np.testing.assert_array_equal(b.indices.cpu().numpy(), m.indices)
    np.testing.assert_array_equal(b.values.cpu().float().numpy(), m.data.astype(np.float32))


# ---- round trips -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo"])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_scipy_round_trip(fmt, index_dtype):
    m = random_csr(37, 53, seed=1)
    src = m.asformat(fmt)
    if fmt == "coo":
        src.row, src.col = src.row.astype(index_dtype), src.col.astype(index_dtype)
    else:
        src.indices, src.indptr = src.indices.astype(index_dtype), src.indptr.astype(index_dtype)
    b = SparseBatch.from_scipy(src)
    assert b.dtype == torch.float32 and b.indices.dtype in INDEX_DTYPES
    if fmt == "csr":  # other formats go through scipy's tocsr(), which picks its own index dtype
        assert b.indices.dtype == torch.from_numpy(np.zeros(0, index_dtype)).dtype
    assert_matches(b, m)
    back = b.to_scipy()
    assert back.format == "csr" and back.shape == m.shape
    np.testing.assert_array_equal(back.toarray(), m.toarray())
    np.testing.assert_array_equal(b.to_dense().numpy(), m.toarray())


@pytest.mark.parametrize("dtype", VALUE_DTYPES)
def test_scipy_value_dtypes(dtype):
    m = random_csr(20, 31, seed=2, dtype=np.float64)
    b = SparseBatch.from_scipy(m, dtype=dtype)
    assert b.dtype == dtype
    assert_matches(b, m)
    back = b.to_scipy()
    assert back.dtype == np.float32  # numpy has no bfloat16, scipy.sparse no float16
    np.testing.assert_array_equal(back.toarray(), m.toarray())


def test_scipy_float64_becomes_float32_and_arrays_are_copied():
    m = random_csr(10, 12, seed=3, dtype=np.float64)
    m32 = m.astype(np.float32)
    b, b32 = SparseBatch.from_scipy(sp.csr_array(m)), SparseBatch.from_scipy(m32)
    assert b.dtype == torch.float32
    expected = m32.copy()
    for src in (m, m32):
        src.data[:] = 99
        src.indices[:] = 0
    assert_matches(b, expected)  # the batches do not alias the matrices' buffers
    assert_matches(b32, expected)


def test_scipy_coo_duplicates_are_summed():
    rows = np.array([2, 0, 2, 0, 2])
    cols = np.array([4, 1, 4, 3, 0])
    vals = np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32)
    coo = sp.coo_matrix((vals, (rows, cols)), shape=(3, 6))
    b = SparseBatch.from_scipy(coo)
    assert_matches(b, coo.tocsr())
    assert b.to_dense()[2, 4] == 4.0


def torch_csr(m, index_dtype, dtype):
    return torch.sparse_csr_tensor(torch.from_numpy(m.indptr).to(index_dtype),
                                   torch.from_numpy(m.indices).to(index_dtype),
                                   torch.from_numpy(m.data).to(dtype), size=m.shape,
                                   check_invariants=True)


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", VALUE_DTYPES)
def test_torch_csr_round_trip(index_dtype, dtype):
    m = random_csr(29, 41, seed=4)
    b = SparseBatch.from_torch(torch_csr(m, index_dtype, dtype))
    assert b.dtype == dtype and b.indices.dtype == index_dtype
    assert_matches(b, m)
    t = b.to_torch()
    assert t.layout == torch.sparse_csr and t.shape == m.shape and t.dtype == dtype
    torch.testing.assert_close(t.to_dense().float(), torch.from_numpy(m.toarray()))


@pytest.mark.parametrize("dtype", VALUE_DTYPES)
def test_torch_coo_round_trip(dtype):
    m = random_csr(23, 37, seed=5)
    coo = torch.from_numpy(m.toarray()).to(dtype).to_sparse_coo()
    b = SparseBatch.from_torch(coo)
    assert b.dtype == dtype and b.indices.dtype == torch.int64
    assert_matches(b, m)
    t = b.to_torch(torch.sparse_coo)
    assert t.layout == torch.sparse_coo and t.is_coalesced() and t.dtype == dtype
    torch.testing.assert_close(t.to_dense(), coo.to_dense())


@pytest.mark.parametrize("dtype", VALUE_DTYPES)
def test_torch_coo_uncoalesced_with_duplicates(dtype):
    """What sentence-transformers' SparseEncoder hands out: COO entries in any order, possibly repeated."""
    rng = np.random.default_rng(6)
    n, dim, nnz = 17, 29, 160
    rows = rng.integers(0, n - 2, nnz)  # the last two rows stay empty
    cols = rng.integers(0, dim, nnz)  # many (row, col) pairs repeat
    vals = np.round(rng.uniform(0.125, 2, nnz) * 8) / 8
    t = torch.sparse_coo_tensor(torch.from_numpy(np.stack([rows, cols])), torch.from_numpy(vals).to(dtype), (n, dim),
                                check_invariants=True)
    assert not t.is_coalesced()
    b = SparseBatch.from_torch(t)
    expected = sp.coo_matrix((vals, (rows, cols)), shape=(n, dim)).tocsr()
    expected.sum_duplicates()
    assert b.nnz == expected.nnz < nnz
    np.testing.assert_array_equal(b.indptr.numpy(), expected.indptr)
    np.testing.assert_array_equal(b.indices.numpy(), expected.indices)
    # Sums of up to a few multiples of 1/8 below 32 are exact in float16; bfloat16 rounds like torch's own sum.
    torch.testing.assert_close(b.values, t.coalesce().values())
    torch.testing.assert_close(b.values.double(), torch.from_numpy(expected.data),
                               **({} if dtype != torch.bfloat16 else dict(atol=0.07, rtol=0.01)))


def test_from_torch_rejects():
    with pytest.raises(TypeError, match="torch sparse tensor"):
        SparseBatch.from_torch(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="layout"):
        SparseBatch.from_torch(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="2 dimensions"):
        SparseBatch.from_torch(torch.zeros(2, 3, 4).to_sparse_coo())
    hybrid = torch.sparse_coo_tensor(torch.tensor([[0, 1]]), torch.ones(2, 3), (2, 3), check_invariants=True)
    with pytest.raises(ValueError, match="hybrid"):
        SparseBatch.from_torch(hybrid)
    with pytest.raises(TypeError, match="values"):
        SparseBatch.from_torch(torch.eye(3, dtype=torch.float64).to_sparse_csr())


# ---- dense -------------------------------------------------------------------------------------------------------


def expected_topk_rows(x: np.ndarray, k, by):
    """Per row, the columns of the k largest non-zeros (by value or |value|), ties to the lower column."""
    out = []
    for row in x:
        cols = np.flatnonzero(row)
        score = np.abs(row[cols]) if by == "abs" else row[cols]
        order = np.lexsort((cols, -score))  # primary -score, then column
        out.append(np.sort(cols[order[:k]]))
    return out


@pytest.mark.parametrize("dtype", VALUE_DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_from_dense_nonzeros(dtype, index_dtype, device):
    m = random_csr(19, 43, seed=7)
    x = torch.from_numpy(m.toarray()).to(dtype).to(device)
    b = SparseBatch.from_dense(x, index_dtype=index_dtype)
    assert b.device == x.device and b.dtype == dtype and b.indices.dtype == index_dtype
    assert_matches(b, m)
    torch.testing.assert_close(b.to_dense(), x)
    torch.testing.assert_close(b.to_dense(torch.float32), x.float())


@pytest.mark.parametrize("by", ["value", "abs"])
@pytest.mark.parametrize("k", [0, 1, 3, 7, 50])
def test_from_dense_topk(by, k, device):
    rng = np.random.default_rng(8)
    # Few distinct values -> many ties; negatives; zeros; rows with fewer non-zeros than k.
    x = rng.choice([-2.0, -1.0, 0.0, 0.0, 0.0, 1.0, 2.0], size=(23, 13)).astype(np.float32)
    x[4] = 0
    x[5] = 0
    x[5, [2, 9]] = [-3.0, -1.0]  # only negatives: by value they are still the largest non-zeros
    b = SparseBatch.from_dense(torch.from_numpy(x).to(device), k=np.int64(k) if k == 3 else k, by=by)
    expected = expected_topk_rows(x, k, by)
    for r, (ind, val) in enumerate(b.to_lists()):
        np.testing.assert_array_equal(ind.cpu().numpy(), expected[r])
        np.testing.assert_array_equal(val.cpu().numpy(), x[r, expected[r]])


def test_from_dense_topk_ties_go_to_lower_column():
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [-2.0, 2.0, 0.0, 2.0, 1.0]])
    b = SparseBatch.from_dense(x, k=2)
    assert [i.tolist() for i, _ in b.to_lists()] == [[1, 2], [1, 3]]
    b = SparseBatch.from_dense(x, k=2, by="abs")
    assert [i.tolist() for i, _ in b.to_lists()] == [[1, 2], [0, 1]]


def test_from_dense_rejects():
    with pytest.raises(TypeError, match="torch.Tensor"):
        SparseBatch.from_dense(np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        SparseBatch.from_dense(torch.ones(3))
    with pytest.raises(TypeError, match="dtype"):
        SparseBatch.from_dense(torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="by"):
        SparseBatch.from_dense(torch.ones(2, 2), k=1, by="magnitude")
    for k in (-1, 1.5, True):
        with pytest.raises(ValueError, match="k"):
            SparseBatch.from_dense(torch.ones(2, 2), k=k)
    for bad in (math.nan, math.inf, -math.inf):
        x = torch.ones(2, 3)
        x[1, 0] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            SparseBatch.from_dense(x)
        with pytest.raises(ValueError, match="NaN or Inf"):
            SparseBatch.from_dense(x, k=1)  # even when the bad entry would not be kept


# ---- lists -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", VALUE_DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_lists_round_trip(dtype, index_dtype):
    m = random_csr(15, 27, seed=9)
    rows = [(m.indices[m.indptr[r]:m.indptr[r + 1]], m.data[m.indptr[r]:m.indptr[r + 1]]) for r in range(15)]
    rows[1] = ([], [])
    rows[2] = (list(map(int, rows[2][0])), [float(v) for v in rows[2][1]])  # plain Python lists
    rows[6] = (torch.from_numpy(rows[6][0]), torch.from_numpy(rows[6][1]))
    b = SparseBatch.from_lists(rows, 27, dtype=dtype, index_dtype=index_dtype)
    assert b.dtype == dtype and b.indices.dtype == index_dtype and len(b) == 15
    for (ind, val), (ind0, val0) in zip(b.to_lists(), rows):
        assert ind.dtype == index_dtype and val.dtype == dtype
        np.testing.assert_array_equal(ind.numpy(), np.asarray(ind0))
        np.testing.assert_array_equal(val.float().numpy(), np.asarray(val0, np.float32))


def test_lists_empty_and_sort():
    b = SparseBatch.from_lists([], 7)
    assert len(b) == 0 and b.nnz == 0 and b.shape == (0, 7) and b.to_lists() == []
    b = SparseBatch.from_lists([([5, 1, 5], [1.0, 2.0, 3.0])], 7, sort=True)
    assert b.indices.tolist() == [1, 5] and b.values.tolist() == [2.0, 4.0]


def test_lists_rejects():
    with pytest.raises(ValueError, match=r"rows\[1\]: 2 indices but 1 values"):
        SparseBatch.from_lists([([0], [1.0]), ([0, 1], [1.0])], 4)
    with pytest.raises(TypeError, match=r"rows\[0\] indices: expected integers"):
        SparseBatch.from_lists([([0.0, 1.0], [1.0, 1.0])], 4)
    with pytest.raises(TypeError, match=r"rows\[0\]: expected an \(indices, values\) pair"):
        SparseBatch.from_lists([([0], [1.0], [2])], 4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        SparseBatch.from_lists([([0, 4], [1.0, 1.0])], 4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        SparseBatch.from_lists([([-1, 2], [1.0, 1.0])], 4)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):  # would wrap around in int32 without the range check
        SparseBatch.from_lists([([2**32 + 1], [1.0])], 8)
    with pytest.raises(ValueError, match="not sorted"):
        SparseBatch.from_lists([([3, 1], [1.0, 1.0])], 4)
    with pytest.raises(ValueError, match="non-finite"):
        SparseBatch.from_lists([([1], [math.nan])], 4)


# ---- sizes, dtypes, devices ------------------------------------------------------------------------------------


def test_sizes():
    m = random_csr(31, 17, seed=10, empty_rows=(0, 5, 30))
    b = SparseBatch.from_scipy(m)
    assert len(b) == 31 and b.shape == (31, 17) and b.nnz == m.nnz
    assert b.row_nnz().dtype == torch.int64
    np.testing.assert_array_equal(b.row_nnz().numpy(), np.diff(m.indptr))
    np.testing.assert_array_equal(b.row_ids().numpy(), m.tocoo().row)
    assert b.nbytes == 32 * 8 + m.nnz * 4 + m.nnz * 4
    assert "rows=31" in repr(b) and "dim=17" in repr(b)


def test_empty_batches():
    for n, dim in ((0, 0), (0, 5), (4, 0), (3, 9)):
        b = SparseBatch(torch.zeros(n + 1, dtype=torch.int64), torch.zeros(0, dtype=torch.int32), torch.zeros(0), dim)
        assert b.shape == (n, dim) and b.nnz == 0
        assert b.row_nnz().tolist() == [0] * n
        assert b.to_dense().shape == (n, dim) and not b.to_dense().any()
        assert b.to_scipy().shape == (n, dim)
        assert b.to_torch().to_dense().shape == (n, dim)
        assert b.to_torch(torch.sparse_coo).to_dense().shape == (n, dim)
        assert len(b[:]) == n and len(b[[]]) == 0 and len(b[::2]) == len(range(0, n, 2))
        assert SparseBatch.cat([b, b]).shape == (2 * n, dim)
        assert_matches(SparseBatch.from_scipy(sp.csr_matrix((n, dim), dtype=np.float32)), sp.csr_matrix((n, dim)))
        assert SparseBatch.from_dense(torch.zeros(n, dim)).shape == (n, dim)
        assert SparseBatch.from_dense(torch.zeros(n, dim), k=3).shape == (n, dim)
        assert SparseBatch(b.indptr, b.indices, b.values, dim, sort=True).shape == (n, dim)


@pytest.mark.parametrize("dtype", VALUE_DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_to(dtype, index_dtype, device):
    m = random_csr(13, 21, seed=11)
    b = SparseBatch.from_scipy(m)
    c = b.to(device, dtype=dtype, index_dtype=index_dtype)
    assert c.device.type == device and c.dtype == dtype and c.indices.dtype == index_dtype
    assert c.indptr.dtype == torch.int64 and c.indptr.device == c.device
    assert_matches(c, m)
    assert c.to(dtype).dtype == dtype  # a dtype in the first position casts, as Tensor.to does
    assert c.to(torch.float32).dtype == torch.float32
    assert_matches(c.cpu(), m)
    assert b.dtype == torch.float32 and b.indices.dtype == torch.int32  # the original is untouched


def test_to_rejects():
    b = SparseBatch.from_scipy(random_csr(3, 5))
    with pytest.raises(TypeError, match="dtype"):
        b.to(dtype=torch.float64)
    with pytest.raises(TypeError, match="index_dtype"):
        b.to(index_dtype=torch.int16)
    with pytest.raises(TypeError, match="dtype given twice"):
        b.to(torch.float16, dtype=torch.float16)
    big = SparseBatch(torch.zeros(2, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0), 2**31)
    with pytest.raises(ValueError, match="int32"):
        big.to(index_dtype=torch.int32)


def test_storage_is_contiguous():
    m = random_csr(6, 9, seed=12)
    wide = torch.from_numpy(np.repeat(m.indices.astype(np.int64), 2))
    b = SparseBatch(torch.from_numpy(m.indptr).long(), wide[::2], torch.from_numpy(m.data).repeat_interleave(2)[::2], 9)
    assert b.indices.is_contiguous() and b.values.is_contiguous()
    assert_matches(b, m)


# ---- rows --------------------------------------------------------------------------------------------------------

SELECTIONS = [
    0, 5, -1, -22, np.int64(3), torch.tensor(4),
    slice(None), slice(2, 9), slice(9, 2), slice(-5, None), slice(None, None, 3), slice(1, 20, 4),
    slice(None, None, -1), slice(18, 2, -3), slice(30, 40), slice(0, 0),
    [], [3], [5, 5, 0, -1, 21], np.array([7, 2], np.int32), torch.tensor([20, 0, 3], dtype=torch.int32),
    torch.tensor([1, 1, 1]), torch.zeros(0, dtype=torch.int64), "mask", "mask-none", "mask-list",
]


@pytest.mark.parametrize("sel", SELECTIONS, ids=lambda s: repr(s).replace(" ", ""))
def test_row_selection(sel, device):
    n = 22
    m = random_csr(n, 15, seed=13, empty_rows=(0, 3, 21))
    b = SparseBatch.from_scipy(m).to(device)
    mask = np.random.default_rng(14).random(n) < 0.4
    if isinstance(sel, str):
        rows = {"mask": torch.from_numpy(mask), "mask-none": torch.zeros(n, dtype=torch.bool),
                "mask-list": mask.tolist()}[sel]
        expected = np.flatnonzero(rows.cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows))
    elif isinstance(sel, slice):
        rows, expected = sel, np.arange(n)[sel]
    elif isinstance(sel, (int, np.integer)) or (isinstance(sel, torch.Tensor) and sel.dim() == 0):
        rows, expected = sel, [int(sel)]
    else:
        rows = sel.to(device) if isinstance(sel, torch.Tensor) else sel
        expected = np.asarray(sel.tolist() if isinstance(sel, torch.Tensor) else sel, np.int64)
    out = b[rows]
    assert out.device == b.device and out.dim == 15
    assert_matches(out, m[np.asarray(expected, np.int64)])


def test_row_selection_rejects():
    b = SparseBatch.from_scipy(random_csr(5, 4))
    for bad in (5, -6, [0, 5], [-6], torch.tensor([9])):
        with pytest.raises(IndexError, match="out of range"):
            b[bad]
    with pytest.raises(IndexError, match="mask"):
        b[torch.ones(4, dtype=torch.bool)]
    with pytest.raises(IndexError, match="bool"):
        b[True]
    for bad in (1.5, [0.5, 1.0], torch.zeros(2, 2, dtype=torch.long)):
        with pytest.raises(IndexError, match="expected an int"):
            b[bad]
    with pytest.raises(IndexError):
        SparseBatch.from_lists([], 3)[0]


def test_cat(device):
    parts = [random_csr(n, 19, seed=15 + n, empty_rows=(0,)) for n in (4, 0, 1, 11)]
    batches = [SparseBatch.from_scipy(p).to(device) for p in parts]
    out = SparseBatch.cat(batches)
    assert out.device == batches[0].device
    assert_matches(out, sp.vstack(parts))
    assert_matches(SparseBatch.cat(iter(batches[:1])), parts[0])


def test_cat_rejects():
    a = SparseBatch.from_scipy(random_csr(3, 5))
    with pytest.raises(ValueError, match="at least one"):
        SparseBatch.cat([])
    with pytest.raises(TypeError, match=r"batches\[1\]"):
        SparseBatch.cat([a, random_csr(3, 5)])
    with pytest.raises(ValueError, match=r"batches\[1\]: dim 6"):
        SparseBatch.cat([a, SparseBatch.from_scipy(random_csr(3, 6))])
    for other in (a.to(torch.float16), a.to(index_dtype=torch.int64)):
        with pytest.raises(ValueError, match="dtypes differ"):
            SparseBatch.cat([a, other])


# ---- validation --------------------------------------------------------------------------------------------------


def csr(indptr, indices, values=None, dim=10, index_dtype=torch.int32, dtype=torch.float32):
    values = [1.0] * len(indices) if values is None else values
    return (torch.tensor(indptr, dtype=torch.int64), torch.tensor(indices, dtype=index_dtype),
            torch.tensor(values, dtype=dtype), dim)


BAD = [
    # (arguments, exception, message)
    (csr([0, 2, 3], [4, 2, 7]), ValueError, r"not sorted within row 0"),
    (csr([0, 1, 3], [4, 7, 2]), ValueError, r"not sorted within row 1"),
    (csr([0, 0, 0, 2], [3, 3]), ValueError, r"duplicated within row 2"),
    (csr([0, 3], [1, 5, 10]), ValueError, r"column index 10 out of range for dim 10"),
    (csr([0, 2], [-1, 3], index_dtype=torch.int64), ValueError, r"negative column index -1"),
    (csr([0, 2, 1, 3], [1, 2, 3]), ValueError, r"non-decreasing"),
    (csr([1, 3], [1, 2, 3]), ValueError, r"must start at 0"),
    (csr([0, 2], [1, 2, 3]), ValueError, r"ends at 2 but there are 3 indices"),
    (csr([0, 1, 4], [1, 2, 3]), ValueError, r"ends at 4 but there are 3 indices"),
    (csr([0, 3], [1, 2, 3], [1.0, 2.0]), ValueError, r"mismatched lengths 3 and 2"),
    (csr([0, 3], [1, 2, 3], [1.0, math.nan, 2.0]), ValueError, r"non-finite value nan at non-zero 1"),
    (csr([0, 3], [1, 2, 3], [1.0, 2.0, math.inf]), ValueError, r"non-finite value inf"),
    (csr([0, 3], [1, 2, 3], [-math.inf, 2.0, 1.0], dtype=torch.float16), ValueError, r"non-finite value -inf"),
    (csr([0, 3], [1, 2, 3], [1.0, 2.0, math.nan], dtype=torch.bfloat16), ValueError, r"non-finite"),
    (csr([0, 3], [1, 2, 3], dtype=torch.float64), TypeError, r"values: expected float32, float16 or bfloat16"),
    (csr([0, 3], [1, 2, 3], index_dtype=torch.int16), TypeError, r"indices: expected int32 or int64"),
    (csr([0, 3], [1, 2, 3], index_dtype=torch.float32), TypeError, r"indices: expected int32 or int64"),
    ((torch.tensor([0, 3], dtype=torch.int32),) + csr([0, 3], [1, 2, 3])[1:], TypeError, r"indptr: expected int64"),
    ((torch.zeros(0, dtype=torch.int64),) + csr([0], [])[1:], ValueError, r"indptr: must hold at least one"),
    (csr([[0, 1]], [1]), ValueError, r"indptr: expected a 1-D tensor"),
    (csr([0, 1], [[1]]), ValueError, r"indices: expected a 1-D tensor"),
    (csr([0, 1], [1], [[1.0]]), ValueError, r"values: expected a 1-D tensor"),
    (csr([0, 1], [1], dim=-3), ValueError, r"dim: must be >= 0"),
    (csr([0, 1], [1], dim=4.5), TypeError, r"dim: expected an int"),
    (csr([0, 1], [1], dim="7"), TypeError, r"dim: expected an int"),
    (csr([0, 1], [1], dim=True), TypeError, r"dim: expected an int"),
    ((torch.tensor([0, 1]), np.array(["a"], dtype=object), torch.ones(1), 4), TypeError, r"indices: expected a tensor"),
]


@pytest.mark.parametrize("args,exc,msg", BAD, ids=[b[2] for b in BAD])
def test_bad_input_raises(args, exc, msg):
    with pytest.raises(exc, match=msg):
        SparseBatch(*args)


def test_bad_input_passes_unchecked_only_with_check_false():
    args = csr([0, 2, 3], [4, 2, 7])
    b = SparseBatch(*args, check=False)  # trusted input: no validation, stored as given
    assert b.indices.tolist() == [4, 2, 7]


def test_mixed_devices_raise():
    indptr, indices, values, dim = csr([0, 2], [1, 3])
    with pytest.raises(ValueError, match="one device"):
        SparseBatch(indptr, indices, values.to("meta"), dim)
    with pytest.raises(ValueError, match="one device"):
        SparseBatch(indptr.to("meta"), indices, values, dim)


def test_numpy_and_list_inputs():
    b = SparseBatch(np.array([0, 2, 3]), np.array([1, 4, 0], np.int32), np.array([1, 2, 3], np.float32), np.int64(5))
    assert b.dim == 5 and b.indices.dtype == torch.int32
    b = SparseBatch([0, 1], [3], [2.0], 4)  # Python lists: int64 indices, float32 values
    assert b.indices.dtype == torch.int64 and b.dtype == torch.float32


# ---- sort=True ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", VALUE_DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_sort_sums_duplicates_like_scipy(dtype, index_dtype, device):
    rng = np.random.default_rng(16)
    n, dim = 21, 13
    counts = rng.integers(0, 12, n)
    counts[[2, 7]] = 0
    indptr = np.concatenate([[0], np.cumsum(counts)])
    indices = rng.integers(0, dim, indptr[-1])  # unsorted, many duplicates within rows
    values = np.round(rng.uniform(-2, 2, indptr[-1]) * 4) / 4
    m = sp.csr_matrix((values, indices, indptr), shape=(n, dim))
    assert not m.has_canonical_format
    expected = m.copy()
    expected.sum_duplicates()  # sorts indices and sums duplicates, keeping explicit zeros
    b = SparseBatch(torch.from_numpy(indptr).to(device), torch.from_numpy(indices).to(index_dtype).to(device),
                    torch.from_numpy(values).to(dtype).to(device), dim, sort=True)
    assert b.dtype == dtype and b.indices.dtype == index_dtype and b.device.type == device
    assert_matches(b, expected)
    with pytest.raises(ValueError, match="pass sort=True"):
        SparseBatch(torch.from_numpy(indptr), torch.from_numpy(indices).to(index_dtype),
                    torch.from_numpy(values).to(dtype), dim)


def test_sort_through_constructors():
    m = sp.csr_matrix((np.array([1.0, 2.0, 3.0], np.float32), np.array([3, 1, 3]), np.array([0, 3])), shape=(1, 5))
    with pytest.raises(ValueError, match="not sorted within row 0"):
        SparseBatch.from_scipy(m)
    assert_matches(SparseBatch.from_scipy(m, sort=True), sp.csr_matrix(([2.0, 4.0], [1, 3], [0, 2]), shape=(1, 5)))
    t = torch.sparse_csr_tensor(torch.tensor([0, 3]), torch.tensor([3, 1, 3]), torch.tensor([1.0, 2.0, 3.0]), (1, 5),
                                check_invariants=False)  # torch would refuse the unsorted row itself
    with pytest.raises(ValueError, match="duplicated|not sorted"):
        SparseBatch.from_torch(t)
    assert SparseBatch.from_torch(t, sort=True).to_dense().tolist() == [[0.0, 2.0, 0.0, 4.0, 0.0]]


def test_sort_rejects_what_it_cannot_fix():
    with pytest.raises(ValueError, match="out of range"):
        SparseBatch(*csr([0, 2], [12, 1]), sort=True)
    with pytest.raises(ValueError, match="non-decreasing"):
        SparseBatch(*csr([0, 2, 1, 3], [1, 1, 2]), sort=True)
    with pytest.raises(ValueError, match="non-finite"):  # float16 duplicates that overflow when summed
        SparseBatch(*csr([0, 2], [1, 1], [60000.0, 60000.0], dtype=torch.float16), sort=True)


def test_sort_with_rows_times_dim_past_int64():
    """rows x dim >= 2^63: rows must not be swapped (a row * dim + column key would overflow)."""
    dim = 2**62
    b = SparseBatch(torch.tensor([0, 2, 4, 5]), torch.tensor([dim - 1, 3, 7, 7, 2**61]),
                    torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), dim, sort=True)
    assert b.indptr.tolist() == [0, 2, 3, 4]
    assert b.indices.tolist() == [3, dim - 1, 7, 2**61] and b.values.tolist() == [2.0, 1.0, 7.0, 5.0]


def test_casts_refuse_values_that_overflow():
    b = SparseBatch.from_lists([([1, 2], [1e6, 0.5])], 5)
    with pytest.raises(ValueError, match="1e\\+06 overflows torch.float16"):
        b.to(torch.float16)
    with pytest.raises(ValueError, match="overflows"):
        SparseBatch.from_lists([([1], [7e4])], 5, dtype=torch.float16)
    with pytest.raises(ValueError, match="docs values: 1e\\+06 overflows"):
        sr.SparseIndex.from_documents(b, torch.float16, progress=False)
    assert b.to(torch.bfloat16).values.isfinite().all()


def test_dense_conversions_carry_gradients():
    """SPLADE training sparsifies dense activations: from_dense/to_dense must keep the autograd graph."""
    x = torch.tensor([[0.0, 2.0, -1.0, 3.0], [0.5, 0.0, 0.0, 0.0]], requires_grad=True)
    b = SparseBatch.from_dense(x, k=2)
    (b.to_dense() * torch.arange(1.0, 9.0).reshape(2, 4)).sum().backward()
    assert x.grad.tolist() == [[0.0, 2.0, 0.0, 4.0], [5.0, 0.0, 0.0, 0.0]]
