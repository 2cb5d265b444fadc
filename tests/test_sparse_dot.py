import pytest
import scipy.sparse  # noqa: F401  (cross-check of the reference)
import torch

import sparse_retrieval as sr
from sparse_retrieval import reference
from sparse_retrieval.sparse import SparseBatch

ops = torch.ops.sparse_retrieval


def random_batch(n, dim, max_nnz, gen, dtype=torch.float32, index_dtype=torch.int32, integer=False):
    """Rows of 0..max_nnz distinct sorted columns (about one row in five empty), random or small-integer values."""
    rows = []
    for _ in range(n):
        m = 0 if torch.rand((), generator=gen) < 0.2 else int(torch.randint(1, max_nnz + 1, (), generator=gen))
        cols = torch.randperm(dim, generator=gen)[:m].sort().values
        vals = (torch.randint(-3, 4, (cols.numel(),), generator=gen).float() if integer
                else torch.randn(cols.numel(), generator=gen))
        rows.append((cols, vals))
    return SparseBatch.from_lists(rows, dim, dtype=dtype, index_dtype=index_dtype)


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_sparse_dot_matches_reference(simd, dtype, index_dtype):
    gen = torch.Generator().manual_seed(1)
    q = random_batch(13, 71, 37, gen, dtype, index_dtype)
    d = random_batch(29, 71, 45, gen, dtype, index_dtype)
    out = sr.sparse_dot(q, d)
    assert out.dtype == torch.float32 and out.shape == (13, 29)
    torch.testing.assert_close(out, reference.sparse_dot(q, d), **tol(dtype))
    torch.testing.assert_close(sr.pairwise_sparse_dot(q, d[:13]), reference.pairwise_sparse_dot(q, d[:13]),
                               **tol(dtype))


def test_reference_agrees_with_scipy():
    gen = torch.Generator().manual_seed(2)
    q, d = random_batch(9, 50, 20, gen), random_batch(17, 50, 20, gen)
    expect = torch.from_numpy((q.to_scipy() @ d.to_scipy().T).toarray()).float()
    torch.testing.assert_close(reference.sparse_dot(q, d), expect)
    torch.testing.assert_close(sr.sparse_dot(q, d), expect, rtol=1e-5, atol=1e-5)


def test_huge_dim_merges_rows(simd):
    # Above kDenseScratchMaxDim the kernels merge sorted rows instead of using a dense scratch row.
    gen = torch.Generator().manual_seed(3)
    dim = (1 << 22) + 5

    def batch(n):  # a few low columns and the last one, so rows overlap at both ends of the range
        cols = [torch.cat([torch.randperm(40, generator=gen)[:3].sort().values, torch.tensor([dim - 1])])
                for _ in range(n)]
        return SparseBatch.from_lists([(c, torch.randn(4, generator=gen)) for c in cols], dim)

    q, d = batch(5), batch(7)
    expect = torch.from_numpy((q.to_scipy() @ d.to_scipy().T).toarray()).float()
    torch.testing.assert_close(sr.sparse_dot(q, d), expect)
    qv = q.values.clone().requires_grad_()
    sr.sparse_dot(SparseBatch(q.indptr, q.indices, qv, dim, check=False), d).sum().backward()
    expect_grad = torch.from_numpy((d.to_scipy().sum(0).A1[q.indices.numpy()])).float()
    torch.testing.assert_close(qv.grad, expect_grad)


def test_empty_batches_and_disjoint_dims(simd):
    empty = SparseBatch.from_lists([], 10)
    rows = SparseBatch.from_lists([([], []), ([1, 3], [1.0, 2.0])], 10)
    other = SparseBatch.from_lists([([0, 2], [5.0, 6.0]), ([3], [4.0])], 10)
    assert sr.sparse_dot(empty, rows).shape == (0, 2)
    assert sr.sparse_dot(rows, empty).shape == (2, 0)
    torch.testing.assert_close(sr.sparse_dot(rows, other), torch.tensor([[0.0, 0.0], [0.0, 8.0]]))
    torch.testing.assert_close(sr.pairwise_sparse_dot(rows, other), torch.tensor([0.0, 8.0]))


@pytest.mark.parametrize("fn", ["sparse_dot", "pairwise_sparse_dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_reference(simd, fn, dtype):
    gen = torch.Generator().manual_seed(4)
    a = random_batch(11, 40, 25, gen, dtype)
    b = random_batch(11, 40, 25, gen, dtype)

    def grads(f):
        av, bv = a.values.clone().requires_grad_(), b.values.clone().requires_grad_()
        out = f(SparseBatch(a.indptr, a.indices, av, 40, check=False), SparseBatch(b.indptr, b.indices, bv, 40,
                                                                                   check=False))
        out.backward(torch.linspace(-1, 2, out.numel()).reshape(out.shape))
        return av.grad, bv.grad

    for got, want in zip(grads(getattr(sr, fn)), grads(getattr(reference, fn))):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), **tol(dtype))


@pytest.mark.filterwarnings("ignore:Input #")  # float32 inputs: tolerances below are loosened to match
@pytest.mark.parametrize("fn", ["sparse_dot", "pairwise_sparse_dot"])
def test_gradcheck(fn):
    gen = torch.Generator().manual_seed(5)
    a, b = random_batch(6, 30, 12, gen), random_batch(6, 30, 12, gen)

    def f(av, bv):
        return getattr(sr, fn)(SparseBatch(a.indptr, a.indices, av, 30, check=False),
                               SparseBatch(b.indptr, b.indices, bv, 30, check=False))

    inputs = (a.values.clone().requires_grad_(), b.values.clone().requires_grad_())
    assert torch.autograd.gradcheck(f, inputs, eps=1e-2, atol=1e-2, rtol=1e-2)


def test_mixed_dtypes_promote():
    gen = torch.Generator().manual_seed(6)
    q = random_batch(5, 20, 8, gen, torch.float16)
    d = random_batch(6, 20, 8, gen, torch.float32, torch.int64)
    torch.testing.assert_close(sr.sparse_dot(q, d), reference.sparse_dot(q, d), rtol=1e-3, atol=1e-3)


def test_opcheck():
    gen = torch.Generator().manual_seed(7)
    a, b = random_batch(5, 33, 9, gen), random_batch(5, 33, 9, gen)
    av, bv = a.values.clone().requires_grad_(), b.values.clone().requires_grad_()
    args = (a.indptr, a.indices, av, b.indptr, b.indices, bv, 33)
    torch.library.opcheck(ops.sparse_dot.default, args)
    torch.library.opcheck(ops.pairwise_sparse_dot.default, args)
    torch.library.opcheck(ops.sparse_dot_backward.default,
                          (torch.randn(5, 5), a.indptr, a.indices, b.indptr, b.indices, b.values, 33))
    torch.library.opcheck(ops.pairwise_sparse_dot_backward.default,
                          (torch.randn(5), a.indptr, a.indices, b.indptr, b.indices, b.values, 33))


def test_bad_inputs():
    a = SparseBatch.from_lists([([1], [1.0])], 10)
    with pytest.raises(ValueError, match="dims differ"):
        sr.sparse_dot(a, SparseBatch.from_lists([([1], [1.0])], 11))
    with pytest.raises(TypeError, match="q: expected a SparseBatch"):
        sr.sparse_dot(a.to_dense(), a)
    with pytest.raises(ValueError, match="row counts differ"):
        sr.pairwise_sparse_dot(a, SparseBatch.cat([a, a]))
    with pytest.raises(ValueError, match="duplicated"):
        SparseBatch.from_lists([([1, 1], [1.0, 2.0])], 10)
    # The ops check what guards memory: indices beyond dim, broken indptr, mismatched dtypes.
    with pytest.raises(IndexError, match="a_indices"):
        ops.sparse_dot(a.indptr, torch.tensor([10], dtype=torch.int32), a.values, a.indptr, a.indices, a.values, 10)
    with pytest.raises(ValueError, match="b_indptr"):
        ops.sparse_dot(a.indptr, a.indices, a.values, torch.tensor([0, 2]), a.indices, a.values, 10)
    with pytest.raises(TypeError, match="dtypes differ"):
        ops.sparse_dot(a.indptr, a.indices, a.values, a.indptr, a.indices, a.values.half(), 10)


@pytest.mark.parametrize("dim", [10, 2**23])  # scattered into a dense scratch row, and merged (past 2^22)
def test_raw_ops_refuse_unsorted_or_repeated_indices(dim):
    """Every row's indices must be strictly ascending: the kernels merge rows or scatter them, and either would give
    a different wrong answer for other orders. Rows may start below where the previous one ended."""
    p = torch.tensor([0, 2, 4])
    good, v = torch.tensor([5, 7, 1, 3]), torch.ones(4)
    forward = (ops.sparse_dot, ops.pairwise_sparse_dot)
    backward = ((ops.sparse_dot_backward, torch.ones(2, 2)), (ops.pairwise_sparse_dot_backward, torch.ones(2)))
    for op in forward:
        op(p, good, v, p, good, v, dim)
    for bad, what in ((torch.tensor([5, 7, 3, 1]), "not ascending within row 1 \\(at non-zero 3\\)"),
                      (torch.tensor([5, 5, 1, 3]), "repeated within row 0 \\(at non-zero 1\\)")):
        for op in forward:
            with pytest.raises(ValueError, match="a_indices: column indices " + what):
                op(p, bad, v, p, good, v, dim)
            with pytest.raises(ValueError, match="b_indices: column indices " + what):
                op(p, good, v, p, bad, v, dim)
        for op, grad in backward:
            with pytest.raises(ValueError, match="a_indices: column indices " + what):
                op(grad, p, bad, p, good, v, dim)
            with pytest.raises(ValueError, match="b_indices: column indices " + what):
                op(grad, p, good, p, bad, v, dim)


def test_an_index_out_of_range_is_named_before_the_order():
    p, v = torch.tensor([0, 3]), torch.ones(3)
    with pytest.raises(IndexError, match=r"a_indices: column indices must lie in \[0, 8\), got \[-1, 5\]"):
        ops.sparse_dot(p, torch.tensor([2, -1, 5]), v, p, torch.tensor([1, 2, 3]), v, 8)


def test_raw_ops_refuse_none_and_non_float_gradients():
    """torch.ops passes None for a tensor as an undefined tensor (a null pointer in the kernels before)."""
    p, i, v = torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([1.0, 2.0])
    for op in (ops.sparse_dot, ops.pairwise_sparse_dot):
        with pytest.raises(TypeError, match="a_values: expected a tensor, got None"):
            op(p, i, None, p, i, v, 8)
        with pytest.raises(TypeError, match="b_values: expected a tensor, got None"):
            op(p, i, v, p, i, None, 8)
        with pytest.raises(TypeError, match="a_indptr: expected a tensor, got None"):
            op(None, i, v, p, i, v, 8)
    for op, grad in ((ops.sparse_dot_backward, torch.ones(1, 1)), (ops.pairwise_sparse_dot_backward, torch.ones(1))):
        with pytest.raises(TypeError, match="b_values: expected a tensor, got None"):
            op(grad, p, i, p, i, None, 8)
        with pytest.raises(TypeError, match="grad: expected a tensor, got None"):
            op(None, p, i, p, i, v, 8)
        for dtype in (torch.complex64, torch.int64, torch.bool):
            with pytest.raises(TypeError, match="grad: expected a floating-point tensor"):
                op(grad.to(dtype), p, i, p, i, v, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_reference(dtype):
    gen = torch.Generator().manual_seed(8)
    q = random_batch(37, 300, 60, gen, dtype).cuda()
    d = random_batch(53, 300, 70, gen, dtype).cuda()
    torch.testing.assert_close(sr.sparse_dot(q, d).cpu(), reference.sparse_dot(q.cpu(), d.cpu()), **tol(dtype))
    torch.testing.assert_close(sr.pairwise_sparse_dot(q, d[:37]).cpu(),
                               reference.pairwise_sparse_dot(q.cpu(), d[:37].cpu()), **tol(dtype))
    qv, dv = q.values.clone().requires_grad_(), d.values.clone().requires_grad_()
    out = sr.sparse_dot(SparseBatch(q.indptr, q.indices, qv, 300, check=False),
                        SparseBatch(d.indptr, d.indices, dv, 300, check=False))
    g = torch.randn(out.shape, device="cuda")
    out.backward(g)
    qr, dr = q.cpu().values.clone().requires_grad_(), d.cpu().values.clone().requires_grad_()
    reference.sparse_dot(SparseBatch(q.indptr.cpu(), q.indices.cpu(), qr, 300, check=False),
                         SparseBatch(d.indptr.cpu(), d.indices.cpu(), dr, 300, check=False)).backward(g.cpu())
    torch.testing.assert_close(qv.grad.cpu().float(), qr.grad.float(), **tol(dtype))
    torch.testing.assert_close(dv.grad.cpu().float(), dr.grad.float(), **tol(dtype))
