"""Datasets: synthetic_splade (shapes, determinism, validity, statistics); the real-text collections (parsers,
chunked cache and resume with a stand-in encoder, derive_documents)."""
import math
import pytest
import torch

from sparse_retrieval import SparseBatch, datasets

from conftest import DEVICES


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


@pytest.mark.parametrize("device", DEVICES)
def test_drawn_on_a_device(device):
    """device= draws on that device (a GPU draws MS MARCO's size in seconds): same statistics, results on the CPU,
    deterministic per seed and device."""
    docs, queries = datasets.synthetic_splade(3000, 200, dim=5000, seed=5, device=device)
    again = datasets.synthetic_splade(3000, 200, dim=5000, seed=5, device=device)
    for b, a, target in ((docs, again[0], 120), (queries, again[1], 50)):
        assert b.indices.device.type == b.values.device.type == "cpu"
        revalidate(b)
        assert torch.equal(b.indices, a.indices) and torch.equal(b.values, a.values)
        assert abs(b.row_nnz().double().mean().item() / target - 1) < 0.05


def test_bad_device():
    with pytest.raises(ValueError, match="device: cannot draw on 'bogus'"):
        datasets.synthetic_splade(10, 2, device="bogus")
    with pytest.raises(TypeError, match="device must be"):
        datasets.synthetic_splade(10, 2, device=3)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: cannot draw on 'cuda'"):
            datasets.synthetic_splade(10, 2, device="cuda")


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


# ---- real-text collections (no model needed: a fake encoder stands in for splade-tiny) -------------------------
import gzip  # noqa: E402

from sparse_retrieval.datasets import derive_documents, man_page_passages, wordnet_passages  # noqa: E402
from sparse_retrieval.datasets.splade import encode_cached, splade_pool  # noqa: E402
from sparse_retrieval.datasets.text import man_page  # noqa: E402


def test_man_page_parser_splits_name_from_body(tmp_path):
    page = ('.TH LS 1\n.SH NAME\nls \\- list directory contents\n.SH SYNOPSIS\n.B ls\n[\\fIOPTION\\fR]\n'
            '.SH DESCRIPTION\nList information about the FILEs ' + "word " * 120 + '\n')
    (tmp_path / "man1").mkdir()
    (tmp_path / "man1" / "ls.1.gz").write_bytes(gzip.compress(page.encode()))
    desc, body = man_page(tmp_path / "man1" / "ls.1.gz")
    assert desc == "list directory contents" and "NAME" not in body and "list directory" not in body
    p = man_page_passages(tmp_path, words=50, max_per_page=8, min_words=20)
    assert len(p.texts) == 3 and all(len(t.split()) <= 50 for t in p.texts)
    assert p.queries == ["list directory contents"] and p.relevant == [[0, 1, 2]]


def test_wordnet_passages_and_usage_example_queries(tmp_path):
    (tmp_path / "data.noun").write_text(
        "  1 This software and database is provided\n"
        "00001740 03 n 02 school 0 schoolhouse 0 000 | a building where young people receive education; "
        '"the school was built in 1932"; "short one"\n'
        "00001741 03 n 01 dog 0 000 | a domestic animal\n")
    for pos in ("verb", "adj", "adv"):
        (tmp_path / f"data.{pos}").write_text("")
    p = wordnet_passages(tmp_path, min_query_words=4)
    assert p.texts == ["school, schoolhouse: a building where young people receive education", "dog: a domestic animal"]
    assert p.queries == ["the school was built in 1932"] and p.relevant == [[0]]


def test_encoding_is_cached_per_chunk_and_resumes(tmp_path, monkeypatch):
    import sparse_retrieval.datasets.splade as splade

    monkeypatch.setattr(splade, "_CHUNK", 4)
    calls = []

    class Fake:
        def __call__(self, texts, bar=None):
            calls.append(len(texts))
            rows = [([len(t) % 7, 7 + len(t) % 5], [1.0, 2.0]) for t in texts]
            return SparseBatch.from_lists(rows, 12)

    texts = [f"text {i}" * (i % 3 + 1) for i in range(10)]
    first = encode_cached(texts, tmp_path, Fake, "x", progress=False)
    assert calls == [4, 4, 2] and len(first) == 10
    (tmp_path / "chunk00001.pt").unlink()  # an interrupted build: one chunk missing
    (tmp_path / "chunk00002.pt").write_bytes(b"damaged")
    calls.clear()
    again = encode_cached(texts, tmp_path, Fake, "x", progress=False)
    assert calls == [4, 2]
    assert torch.equal(again.indices, first.indices) and torch.equal(again.values, first.values)


def test_derive_documents_keeps_the_real_ones_and_their_statistics():
    d, _ = datasets.synthetic_splade(3000, 0, dim=2000, doc_nnz=40, seed=4)
    grown = derive_documents(d, 12000, seed=1, progress=False)
    assert len(grown) == 12000 and grown.dim == d.dim
    assert torch.equal(grown[:3000].indices, d.indices) and torch.equal(grown[:3000].values, d.values)
    SparseBatch(grown.indptr, grown.indices, grown.values, grown.dim)  # valid: sorted, unique, in range
    new = grown[3000:]
    assert 0.8 < new.nnz / len(new) / (d.nnz / len(d)) < 1.1
    assert abs(float(new.values.mean()) - float(d.values.mean())) < 0.1 * float(d.values.mean())
    # every new document's terms come from real documents: no term outside the real vocabulary
    assert set(new.indices.unique().tolist()) <= set(d.indices.unique().tolist())
    again = derive_documents(d, 12000, seed=1, progress=False)
    assert torch.equal(again.indices, grown.indices)
    with pytest.raises(ValueError, match="n"):
        derive_documents(d, 10, progress=False)


def test_splade_pool_is_max_of_log_saturated_logits_over_unpadded_tokens():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 7, generator=gen) * 3
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    out = splade_pool(logits, mask)
    for b in range(3):
        for v in range(7):
            kept = [max(float(logits[b, t, v]), 0.0) for t in range(5) if mask[b, t]]
            assert out[b, v].item() == pytest.approx(math.log1p(max(kept)) if kept else 0.0, abs=1e-6)
    logits.requires_grad_(True)
    splade_pool(logits, mask).sum().backward()
    assert logits.grad[2].abs().sum() == 0 and logits.grad[1, 2:].abs().sum() == 0

