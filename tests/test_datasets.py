"""synthetic_splade: shapes, determinism, validity and SPLADE-like statistics."""
import pytest
import torch

from sparse_retrieval import SparseBatch, datasets


@pytest.fixture(scope="module")
def default_data():
    return datasets.synthetic_splade(2000, 400, seed=0)


def revalidate(b: SparseBatch) -> None:
    """Rebuilding with checks on proves indices sorted and unique within rows, in range, values finite."""
    SparseBatch(b.indptr, b.indices, b.values, b.dim)


def test_shapes_and_dtypes(default_data):
    docs, queries = default_data
    assert docs.shape == (2000, 30522) and queries.shape == (400, 30522)
    for b in (docs, queries):
        assert b.indptr.dtype == torch.int64 and b.indices.dtype == torch.int32 and b.dtype == torch.float32
        assert b.device.type == "cpu"
        revalidate(b)


def test_deterministic_per_seed():
    a = datasets.synthetic_splade(300, 50, dim=5000, seed=7)
    b = datasets.synthetic_splade(300, 50, dim=5000, seed=7)
    c = datasets.synthetic_splade(300, 50, dim=5000, seed=8)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x.indptr, y.indptr) and torch.equal(x.indices, y.indices) and torch.equal(x.values, y.values)
        assert not (x.nnz == z.nnz and torch.equal(x.indices, z.indices))


def test_row_lengths_near_targets(default_data):
    docs, queries = default_data
    for b, target in ((docs, 120), (queries, 50)):
        lengths = b.row_nnz().double()
        assert abs(lengths.mean().item() / target - 1) < 0.03
        assert lengths.min().item() >= 1
        assert 0.2 < lengths.std().item() / target < 0.6  # lengths vary like real encoders', not constant
    d, q = datasets.synthetic_splade(1000, 1000, dim=2000, doc_nnz=30, query_nnz=8, seed=1)
    assert abs(d.row_nnz().double().mean().item() / 30 - 1) < 0.04
    assert abs(q.row_nnz().double().mean().item() / 8 - 1) < 0.05


def test_positive_skewed_weights(default_data):
    for b in default_data:
        assert bool((b.values > 0).all()) and bool(torch.isfinite(b.values).all())
        assert b.values.median() < b.values.mean() < b.values.max() / 3  # a long upper tail


def test_zipf_like_popularity(default_data):
    docs, queries = default_data
    counts = torch.bincount(docs.indices.long(), minlength=docs.dim).double()
    ranked = counts.sort(descending=True).values
    median = max(ranked.median().item(), 1.0)
    assert ranked[:10].mean().item() > 100 * median  # the head is far more frequent than the median dimension
    assert ranked[10].item() > 3 * ranked[1000].item() > 3 * median
    # Documents and queries share the popularity law: their most frequent dimensions mostly coincide.
    qcounts = torch.bincount(queries.indices.long(), minlength=docs.dim)
    top_docs, top_queries = set(counts.topk(100).indices.tolist()), set(qcounts.topk(100).indices.tolist())
    assert len(top_docs & top_queries) > 60
    # The popular dimensions are spread over the vocabulary, not the first ids.
    assert counts.topk(100).indices.float().mean().item() > 5000


def test_small_dims_and_empty_sets():
    d, q = datasets.synthetic_splade(200, 0, dim=40, doc_nnz=60, query_nnz=5, seed=2)
    assert len(q) == 0 and q.nnz == 0 and q.dim == 40
    assert int(d.row_nnz().max()) <= 40
    revalidate(d)
    d, q = datasets.synthetic_splade(0, 10, dim=1, doc_nnz=3, query_nnz=0, seed=3)
    assert len(d) == 0 and q.shape == (10, 1) and q.nnz == 0
    d, _ = datasets.synthetic_splade(5, 1, dim=1, seed=4)
    assert d.indices.tolist() == [0] * 5


@pytest.mark.parametrize("kwargs,message", [
    (dict(n_docs=-1), "n_docs"),
    (dict(n_queries=-2), "n_queries"),
    (dict(doc_nnz=-1), "doc_nnz"),
    (dict(query_nnz=-5), "query_nnz"),
    (dict(dim=0), "dim"),
    (dict(zipf_exponent=-0.5), "zipf_exponent"),
    (dict(zipf_exponent=float("nan")), "zipf_exponent"),
])
def test_bad_arguments_raise(kwargs, message):
    args = dict(n_docs=10, n_queries=2) | kwargs
    with pytest.raises(ValueError, match=message):
        datasets.synthetic_splade(**args)


@pytest.mark.parametrize("kwargs,message", [
    (dict(n_docs=2.5), "n_docs must be an int"),
    (dict(dim=3e4), "dim must be an int"),
    (dict(doc_nnz=True), "doc_nnz must be an int"),
    (dict(query_nnz="50"), "query_nnz must be an int"),
    (dict(seed=0.5), "seed must be an int"),
])
def test_bad_argument_types_raise(kwargs, message):
    args = dict(n_docs=10, n_queries=2) | kwargs
    with pytest.raises(TypeError, match=message):
        datasets.synthetic_splade(**args)
