"""The references cross-checked against independent implementations (scipy products, numpy sorts, plain loops)."""
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sparse_retrieval import SparseBatch, reference

VALUE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_batch(n, dim, density, seed, dtype=torch.float32, integer=False, empty_rows=(1,)):
    """A random SparseBatch and the same matrix in scipy (float64, values as stored in dtype)."""
    rng = np.random.default_rng(seed)
    m = sp.random(n, dim, density=density, format="csr", random_state=rng)
    m.data = rng.integers(1, 4, m.nnz).astype(np.float64) if integer else rng.uniform(-1, 2, m.nnz)
    for r in empty_rows:
        if r < n:
            m.data[m.indptr[r]:m.indptr[r + 1]] = 0
    m.eliminate_zeros()
    b = SparseBatch.from_scipy(m, dtype=dtype)
    return b, sp.csr_matrix((b.values.double().numpy(), m.indices, m.indptr), shape=m.shape)


# ---- sparse x sparse ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", VALUE_DTYPES)
def test_sparse_dot_matches_scipy(dtype):
    q, qm = random_batch(13, 57, 0.2, seed=1, dtype=dtype)
    d, dm = random_batch(29, 57, 0.15, seed=2, dtype=dtype, empty_rows=(0, 28))
    out = reference.sparse_dot(q, d)
    assert out.dtype == torch.float32 and out.shape == (13, 29)
    np.testing.assert_allclose(out.numpy(), (qm @ dm.T).toarray(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", VALUE_DTYPES)
def test_pairwise_sparse_dot_matches_scipy(dtype):
    a, am = random_batch(31, 40, 0.3, seed=3, dtype=dtype, empty_rows=(1, 4))
    b, bm = random_batch(31, 40, 0.3, seed=4, dtype=dtype, empty_rows=(4, 30))
    out = reference.pairwise_sparse_dot(a, b)
    assert out.dtype == torch.float32 and out.shape == (31,)
    np.testing.assert_allclose(out.numpy(), np.asarray(am.multiply(bm).sum(1)).ravel(), rtol=1e-5, atol=1e-5)


def test_sparse_dot_rejects():
    a, _ = random_batch(3, 10, 0.5, seed=5)
    b, _ = random_batch(4, 11, 0.5, seed=6)
    with pytest.raises(ValueError, match="dims differ"):
        reference.sparse_dot(a, b)
    with pytest.raises(ValueError, match="dims differ"):
        reference.sparse_search(a, b, 2)
    c, _ = random_batch(4, 10, 0.5, seed=7)
    with pytest.raises(ValueError, match="row counts differ"):
        reference.pairwise_sparse_dot(a, c)
    with pytest.raises(ValueError, match="k"):
        reference.sparse_search(a, c, -1)


def scipy_search(qm, dm, k):
    """Exact search with scipy and numpy: argpartition finds the k-th best score, then a lexsort orders the
    candidates by score descending and id ascending. Padded with -inf / -1 beyond the number of documents."""
    s = (qm @ dm.T).toarray()
    nq, nd = s.shape
    kk = min(k, nd)
    scores, ids = np.full((nq, k), -np.inf), np.full((nq, k), -1, np.int64)
    for i in range(nq):
        if kk == 0:
            continue
        row = s[i]
        kth = row[np.argpartition(-row, kk - 1)[:kk]].min()
        cand = np.flatnonzero(row >= kth)
        best = cand[np.lexsort((cand, -row[cand]))[:kk]]
        scores[i, :kk], ids[i, :kk] = row[best], best
    return scores, ids


@pytest.mark.parametrize("k", [0, 1, 4, 17, 30, 33])
def test_sparse_search_with_ties_matches_scipy(k):
    # Small integer weights over few dimensions: many equal scores (and zero scores), exact in float32.
    q, qm = random_batch(11, 12, 0.3, seed=8, integer=True, empty_rows=(2,))
    d, dm = random_batch(30, 12, 0.25, seed=9, integer=True, empty_rows=(0, 7, 8))
    scores, ids = reference.sparse_search(q, d, k)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64
    assert scores.shape == ids.shape == (11, k)
    exp_scores, exp_ids = scipy_search(qm, dm, k)
    np.testing.assert_array_equal(ids.numpy(), exp_ids)
    np.testing.assert_array_equal(scores.numpy(), exp_scores)


@pytest.mark.parametrize("dtype", VALUE_DTYPES)
def test_sparse_search_random_weights(dtype):
    q, qm = random_batch(9, 300, 0.05, seed=10, dtype=dtype)
    d, dm = random_batch(200, 300, 0.03, seed=11, dtype=dtype)
    k = 25
    scores, ids = reference.sparse_search(q, d, k)
    exact = (qm @ dm.T).toarray()
    exp_scores, _ = scipy_search(qm, dm, k)
    np.testing.assert_allclose(scores.numpy(), exp_scores, rtol=1e-5, atol=1e-5)
    # Ids may only differ between scores equal to float32 rounding: each id must carry its score.
    np.testing.assert_allclose(np.take_along_axis(exact, ids.numpy(), 1), scores.numpy(), rtol=1e-5, atol=1e-5)
    assert all(len(set(row)) == k for row in ids.tolist())


def test_sparse_search_no_docs():
    q, _ = random_batch(3, 10, 0.5, seed=12)
    empty = SparseBatch.from_lists([], 10)
    scores, ids = reference.sparse_search(q, empty, 4)
    assert torch.equal(ids, torch.full((3, 4), -1)) and bool((scores == -math.inf).all())
    scores, ids = reference.sparse_search(empty, q, 2)
    assert scores.shape == ids.shape == (0, 2)


# ---- top-k -------------------------------------------------------------------------------------------------------


def numpy_topk(x: np.ndarray, k: int, largest: bool):
    """Along the last axis with numpy's lexsort: NaN above everything, equal values by increasing index."""
    idx = np.arange(x.shape[-1])
    out = []
    for row in x.reshape(-1, x.shape[-1]):
        nan = np.isnan(row)
        base = np.where(nan, 0, row)
        order = np.lexsort((idx, -base, ~nan)) if largest else np.lexsort((idx, base, nan))
        out.append(order[:k])
    ids = np.array(out, np.int64).reshape(*x.shape[:-1], k)
    return np.take_along_axis(x, ids, -1), ids


def tie_heavy(shape, seed, dtype=torch.float32):
    rng = np.random.default_rng(seed)
    pool = np.array([-np.inf, -2.0, -0.0, 0.0, 0.5, 0.5, 1.0, 3.0, np.inf, np.nan], np.float32)
    x = rng.choice(pool, size=shape)
    x[..., 0] = 1.0  # another tie partner for 1.0
    return torch.from_numpy(x).to(dtype)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("dtype", VALUE_DTYPES)
@pytest.mark.parametrize("k", [0, 1, 5, 19])
def test_topk_matches_numpy(largest, dtype, k):
    x = tie_heavy((7, 19), seed=13, dtype=dtype)
    values, ids = reference.topk(x, k, largest=largest)
    assert values.dtype == dtype and ids.dtype == torch.int64 and ids.shape == (7, k)
    exp_values, exp_ids = numpy_topk(x.double().numpy(), k, largest)
    np.testing.assert_array_equal(ids.numpy(), exp_ids)
    np.testing.assert_array_equal(values.double().numpy(), exp_values)  # NaN == NaN here


def test_topk_along_other_dims():
    x = tie_heavy((5, 9, 6), seed=14)
    for dim in (0, 1, -2):
        values, ids = reference.topk(x, 3, dim=dim)
        moved = x.movedim(dim, -1).numpy()
        exp_values, exp_ids = numpy_topk(moved, 3, True)
        np.testing.assert_array_equal(ids.movedim(dim, -1).numpy(), exp_ids)
        np.testing.assert_array_equal(values.movedim(dim, -1).numpy(), exp_values)
    values, ids = reference.topk(torch.tensor([2.0, math.nan, 2.0, math.inf]), 3)
    assert ids.tolist() == [1, 3, 0]


def test_topk_rejects_k_out_of_range():
    for k in (-1, 8):
        with pytest.raises(ValueError, match=r"k must lie in \[0, 7\]"):
            reference.topk(torch.zeros(3, 7), k)


@pytest.mark.parametrize("by", ["value", "abs"])
@pytest.mark.parametrize("k", [0, 2, 6, 40])
def test_topk_sparsify_values_and_gradient(by, k):
    rng = np.random.default_rng(15)
    x = rng.choice([-3.0, -1.0, 0.0, 1.0, 1.0, 2.0, -np.inf], size=(2, 5, 11))
    x = torch.from_numpy(x).float().requires_grad_()
    out = reference.topk_sparsify(x, k, by=by)
    score = np.abs(x.detach().numpy()) if by == "abs" else x.detach().numpy()
    _, keep_ids = numpy_topk(score, min(k, 11), True)
    keep = np.zeros(x.shape, bool)
    np.put_along_axis(keep, keep_ids, True, -1)
    np.testing.assert_array_equal(out.detach().numpy(), np.where(keep, x.detach().numpy(), 0.0))  # no NaN
    grad = torch.randn(x.shape)
    out.backward(grad)
    np.testing.assert_array_equal(x.grad.numpy(), np.where(keep, grad.numpy(), 0.0))


def test_topk_sparsify_rejects():
    with pytest.raises(ValueError, match="by"):
        reference.topk_sparsify(torch.ones(2, 3), 1, by="max")
    with pytest.raises(ValueError, match="k"):
        reference.topk_sparsify(torch.ones(2, 3), -1)


# ---- k-means and coupled quantization -------------------------------------------------------------------------


def loop_kmeans(x: np.ndarray, centroids: np.ndarray, iters: int, w: np.ndarray) -> np.ndarray:
    """Textbook weighted Lloyd iterations: ties to the lower centroid, an emptied cluster keeps its centroid."""
    c = centroids.astype(np.float64).copy()
    for _ in range(iters):
        assign = np.array([int(np.argmin(((c - p) ** 2).sum(1))) for p in x])
        new = c.copy()
        for j in range(len(c)):
            members = assign == j
            mass = w[members].sum()
            if mass > 0:
                new[j] = (w[members, None] * x[members]).sum(0) / mass
        c = new
    return c


def blobs(n, c, n_blobs, seed):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, (n_blobs, c))
    return (centers[rng.integers(0, n_blobs, n)] + rng.normal(0, 1, (n, c))).astype(np.float32)


@pytest.mark.parametrize("init", ["k-means++", "random"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("seed", [0, 3])
def test_kmeans_matches_loop(init, weighted, seed):
    x = blobs(41, 3, 4, seed=16 + seed)
    rng = np.random.default_rng(seed)
    w = rng.uniform(0, 2, 41).astype(np.float32) if weighted else np.ones(41, np.float32)
    if weighted:
        w[:5] = 0
    wt = torch.from_numpy(w) if weighted else None
    seeds = reference.kmeans(torch.from_numpy(x), 5, iters=0, weights=wt, init=init, seed=seed)
    assert seeds.shape == (5, 3) and seeds.dtype == torch.float32
    seed_rows = [int(np.flatnonzero((x == s).all(1))[0]) for s in seeds.numpy()]  # seeds are rows of x
    assert len(set(seed_rows)) == 5
    if weighted and init == "k-means++":
        assert all(w[r] > 0 for r in seed_rows)  # zero-weight rows have zero probability
    for iters in (1, 2, 15):
        out = reference.kmeans(torch.from_numpy(x), 5, iters=iters, weights=wt, init=init, seed=seed)
        np.testing.assert_allclose(out.numpy(), loop_kmeans(x, seeds.numpy(), iters, w), rtol=1e-5, atol=1e-5)
    again = reference.kmeans(torch.from_numpy(x), 5, iters=15, weights=wt, init=init, seed=seed)
    assert torch.equal(again, out)  # deterministic per seed


def test_kmeans_plus_plus_never_picks_a_chosen_point_twice():
    pts = np.array([[0, 0], [5, 0], [0, 7]], np.float32)
    x = np.repeat(pts, [20, 1, 1], axis=0)  # duplicates of the likely first seed have zero distance
    for seed in range(5):
        seeds = reference.kmeans(torch.from_numpy(x), 3, iters=0, seed=seed).numpy()
        assert sorted(map(tuple, seeds)) == sorted(map(tuple, pts))


def test_kmeans_degenerate():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = reference.kmeans(x, 4, iters=3, init="random")
    assert out.shape == (4, 2)
    assert sorted(map(tuple, out[:2].tolist())) == [(1.0, 2.0), (3.0, 4.0)] and torch.equal(out[2:], out[1:2].expand(2, 2))
    same = torch.ones(6, 3)
    out = reference.kmeans(same, 3, iters=2)  # k-means++ runs out of distinct points
    assert torch.equal(out, torch.ones(3, 3))
    assert reference.kmeans(x.half(), 1, iters=5).dtype == torch.float32
    torch.testing.assert_close(reference.kmeans(x, 1, iters=1), torch.tensor([[2.0, 3.0]]))
    with pytest.raises(ValueError, match="at least one row"):
        reference.kmeans(torch.zeros(0, 2), 2)
    with pytest.raises(ValueError, match="n_clusters"):
        reference.kmeans(x, 0)
    with pytest.raises(ValueError, match="init"):
        reference.kmeans(x, 2, init="forgy")


def test_nearest_centroid_ties_to_lower_index():
    centroids = torch.tensor([[9.0, 9.0], [1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    x = torch.tensor([[0.0, 5.0], [2.0, 0.0], [-3.0, 0.0], [8.0, 9.0]])
    assert reference.nearest_centroid(x, centroids).tolist() == [1, 1, 2, 0]
    rng = np.random.default_rng(17)
    xs, cs = rng.normal(size=(50, 4)).astype(np.float32), rng.normal(size=(7, 4)).astype(np.float32)
    expected = [int(np.argmin(((cs - p) ** 2).sum(1))) for p in xs]
    assert reference.nearest_centroid(torch.from_numpy(xs), torch.from_numpy(cs)).tolist() == expected


@pytest.mark.parametrize("n_centroids,code_dtype", [(6, torch.uint8), (256, torch.uint8), (300, torch.int16)])
def test_cq_round_trip_on_centroids(n_centroids, code_dtype):
    groups, g = 3, 2
    books = torch.randn(groups, n_centroids, g, generator=torch.Generator().manual_seed(18))
    codes = torch.randint(0, n_centroids, (2, 5, groups), generator=torch.Generator().manual_seed(19))
    x = reference.cq_decode(codes, books)
    assert x.shape == (2, 5, groups * g) and x.dtype == books.dtype
    for j in range(groups):  # decoding is a plain codebook lookup per group
        torch.testing.assert_close(x[..., j * g:(j + 1) * g], books[j][codes[..., j]])
    enc = reference.cq_encode(x, books)
    assert enc.dtype == code_dtype and enc.shape == codes.shape
    assert torch.equal(enc.long(), codes)
    assert torch.equal(reference.cq_decode(enc, books), x)


def test_cq_encode_ties_to_lowest_code():
    books = torch.tensor([[[4.0, 4.0], [1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]]])  # (1 group, 4 centroids, g=2)
    x = torch.tensor([[1.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    assert reference.cq_encode(x, books).tolist() == [[1], [1], [2]]
    with pytest.raises(ValueError, match="channels"):
        reference.cq_encode(torch.zeros(2, 3), books)


def loop_cq_attention(q, k_codes, v_codes, k_books, v_books, k_recent, v_recent, lengths, scale):
    """Per (batch, query head, query): decode the visible tokens one by one, softmax in float64."""
    B, Hq, Tq, D = q.shape
    Hkv, T, G = k_codes.shape[1:]
    W = 0 if k_recent is None else k_recent.shape[2]
    rep = Hq // Hkv

    def decode(codes, books, b, hk, s):
        return torch.cat([books[hk * G + j, int(codes[b, hk, s, j])] for j in range(G)]).double()

    out = torch.zeros(B, Hq, Tq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            hk = h // rep
            tokens = [(s, decode(k_codes, k_books, b, hk, s), decode(v_codes, v_books, b, hk, s))
                      for s in range(int(lengths[b]))]
            tokens += [(T + w, k_recent[b, hk, w].double(), v_recent[b, hk, w].double()) for w in range(W)]
            for t in range(Tq):
                own = T + W - Tq + t
                seen = [(key, val) for pos, key, val in tokens if pos <= own]
                logits = torch.stack([q[b, h, t].double() @ key * scale for key, _ in seen])
                p = torch.softmax(logits, 0)
                out[b, h, t] = sum(pi * val for pi, (_, val) in zip(p, seen))
    return out


CQ_CASES = [
    # B, Hq, Hkv, Tq, D, g, T, W, K, lengths, scale, q dtype
    (3, 4, 2, 1, 8, 2, 7, 3, 6, [7, 0, 5], None, torch.float32),  # GQA, an empty coded history
    (2, 4, 2, 2, 8, 4, 5, 3, 5, [5, 2], None, torch.float32),  # two queries, causal in the window
    (2, 2, 2, 1, 6, 3, 6, 0, 4, [6, 3], 0.3, torch.float16),  # MHA, no window, explicit scale
    (1, 6, 1, 3, 4, 1, 4, 3, 3, None, None, torch.bfloat16),  # MQA, queries span the whole window
]


@pytest.mark.parametrize("case", CQ_CASES)
def test_cq_attention_matches_loop(case):
    B, Hq, Hkv, Tq, D, g, T, W, K, lengths, scale, dtype = case
    G = D // g
    gen = torch.Generator().manual_seed(20)
    q = torch.randn(B, Hq, Tq, D, generator=gen).to(dtype)
    k_codes = torch.randint(0, K, (B, Hkv, T, G), generator=gen).to(torch.uint8)
    v_codes = torch.randint(0, K, (B, Hkv, T, G), generator=gen).to(torch.uint8)
    k_books = torch.randn(Hkv * G, K, g, generator=gen)
    v_books = torch.randn(Hkv * G, K, g, generator=gen)
    k_recent = torch.randn(B, Hkv, W, D, generator=gen) if W else None
    v_recent = torch.randn(B, Hkv, W, D, generator=gen) if W else None
    lens = None if lengths is None else torch.tensor(lengths)
    out = reference.cq_attention(q, k_codes, v_codes, k_books, v_books, k_recent, v_recent, lens, scale)
    assert out.dtype == torch.float32 and out.shape == (B, Hq, Tq, D)
    expected = loop_cq_attention(q, k_codes, v_codes, k_books, v_books, k_recent, v_recent,
                                 [T] * B if lengths is None else lengths, 1 / math.sqrt(D) if scale is None else scale)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_cq_attention_rejects_head_mismatch():
    q = torch.zeros(1, 3, 1, 4)
    codes = torch.zeros(1, 2, 5, 2, dtype=torch.uint8)
    books = torch.zeros(4, 3, 2)
    with pytest.raises(ValueError, match="heads"):
        reference.cq_attention(q, codes, codes, books, books)
