"""Block-max pruned search (SparseIndex modes "safe" and "approximate"): safe results equal exhaustive ones bit for
bit, on random and clustered data of awkward sizes, every SIMD level, after add and after save/load; approximate
recall only grows with alpha; bad parameters and damaged structures raise."""
import struct
import zlib

import pytest
import torch

import sparse_retrieval as sr
from sparse_retrieval.block_search import build_block_max, cluster_order, validate_block_max
from sparse_retrieval.sparse import SparseBatch

ops = torch.ops.sparse_retrieval


def clustered(n, dim, topics, gen, dtype=torch.float32, duplicates=0.1, coarse=False):
    """Documents drawn from `topics` topics (each a random set of terms), non-negative weights, a share of exact
    duplicates (ties), about one row in twenty empty. `coarse` rounds weights to quarters (many equal scores)."""
    vocab = [torch.randperm(dim, generator=gen)[:max(2, dim // 6)] for _ in range(topics)]
    rows = []
    for _ in range(n):
        if rows and torch.rand((), generator=gen) < duplicates:
            rows.append(rows[int(torch.randint(len(rows), (), generator=gen))])
            continue
        if torch.rand((), generator=gen) < 0.05:
            rows.append(([], []))
            continue
        t = vocab[int(torch.randint(topics, (), generator=gen))]
        m = int(torch.randint(1, t.numel() + 1, (), generator=gen))
        cols = torch.cat([t[torch.randperm(t.numel(), generator=gen)[:m]],
                          torch.randint(dim, (2,), generator=gen)]).unique()
        vals = torch.rand(cols.numel(), generator=gen) * 3
        if coarse:
            vals = (vals * 4).round() / 4
        rows.append((cols.tolist(), vals.tolist()))
    return SparseBatch.from_lists(rows, dim, dtype=dtype)


def queries_for(docs, n, gen, negative=False):
    """Queries made of terms of random documents plus noise terms; some empty; optionally negative weights."""
    rows = []
    for i in range(n):
        if i % 11 == 3:
            rows.append(([], []))
            continue
        d = docs[int(torch.randint(len(docs), (), generator=gen))]
        cols = torch.cat([d.indices.long()[torch.randperm(d.nnz, generator=gen)[:6]],
                          torch.randint(docs.dim, (3,), generator=gen)]).unique()
        vals = torch.rand(cols.numel(), generator=gen) + 0.1
        if negative:
            vals = torch.where(torch.rand(cols.numel(), generator=gen) < 0.3, -vals, vals)
        rows.append((cols.tolist(), vals.tolist()))
    return SparseBatch.from_lists(rows, docs.dim)


def assert_same(a, b):
    assert torch.equal(a[1], b[1]), "ids differ"
    assert torch.equal(a[0], b[0]), "scores differ"


@pytest.mark.parametrize("n,block_size,superblock,k", [(1, 1, 1, 1), (97, 8, 3, 5), (1000, 32, 16, 10),
                                                      (777, 7, 5, 40), (300, 64, 1, 400), (2500, 4, 64, 10)])
@pytest.mark.parametrize("kind", ["random", "clustered", "coarse"])
def test_safe_equals_exhaustive(simd, n, block_size, superblock, k, kind):
    gen = torch.Generator().manual_seed(n * 31 + block_size + len(kind))
    if kind == "random":
        docs = SparseBatch(*(lambda b: (b.indptr, b.indices, b.values.abs()))(
            __import__("test_sparse_dot").random_batch(n, 300, 40, gen)), 300)
    else:
        docs = clustered(n, 400, 6, gen, coarse=kind == "coarse")
    queries = queries_for(docs, 40, gen, negative=kind == "random")
    index = sr.SparseIndex.from_documents(docs, block_max=True, block_size=block_size, superblock=superblock,
                                          progress=False)
    exact = index.search(queries, k, mode="exact")
    for threads in (1, 3):
        assert_same(index.search(queries, k, threads, mode="safe"), exact)
    assert_same(index.search(queries, k), exact)  # safe is the default once optimized
    assert_same(index.search(queries, k, mode="approximate", alpha=1.0), exact)


@pytest.mark.parametrize("block_size,superblock", [(8, 1), (100, 1), (130, 3)])
def test_safe_with_filter_equals_exhaustive(simd, block_size, superblock, monkeypatch):
    """Blocks skip disallowed documents before scoring them (listed 64 at a time: blocks of 100 and 130 cross
    that), including blocks with no allowed document at all (most blocks of 8 at 2% allowed). The scan of the
    allowed documents alone is switched off: the pruning kernel is under test."""
    monkeypatch.setattr(sr.index, "_SCAN_SHARE", 0.0)
    gen = torch.Generator().manual_seed(block_size)
    docs = clustered(1500, 400, 6, gen)
    queries = queries_for(docs, 30, gen)
    index = sr.SparseIndex.from_documents(docs, block_max=True, block_size=block_size, superblock=superblock,
                                          progress=False)
    for share in (0.02, 0.1, 0.5):
        mask = torch.rand(1500, generator=gen) < share
        assert_same(index.search(queries, 7, mode="safe", filter=mask),
                    index.search(queries, 7, mode="exact", filter=mask))


@pytest.mark.parametrize("k", [1, 7, 60])
def test_scan_of_allowed_documents_equals_the_reference(simd, k, monkeypatch):
    """With the scan forced on, every mode scores exactly the allowed documents: results as the reference's, scores
    bit for bit as exhaustive search's, for empty queries, negative weights, k beyond the allowed count, nothing
    allowed, deleted documents and documents added after optimize() (kept in an exhaustive tail)."""
    gen = torch.Generator().manual_seed(40 + k)
    docs = clustered(700, 300, 5, gen, dtype=torch.float16)
    queries = queries_for(docs, 25, gen, negative=True)
    more = clustered(90, 300, 5, gen, dtype=torch.float16)
    index = sr.SparseIndex.from_documents(docs, block_max=True, block_size=8, progress=False)
    index.add(more)
    index.delete(torch.arange(0, 790, 13))
    everything = SparseBatch.cat([docs, more])
    for share in (0.0, 0.01, 0.3, 1.0):
        mask = torch.rand(790, generator=gen) < share
        allowed = mask.clone()
        allowed[::13] = False
        monkeypatch.setattr(sr.index, "_SCAN_SHARE", 0.0)
        kernel = index.search(queries, k, mode="exact", filter=mask)
        monkeypatch.setattr(sr.index, "_SCAN_SHARE", float("inf"))
        ref = sr.reference.sparse_search(queries, everything, k, allowed)
        for mode, kw in (("exact", {}), ("safe", {}), ("approximate", {"alpha": 0.5, "query_cut": 2})):
            got = index.search(queries, k, mode=mode, filter=mask, **kw)
            assert_same(got, kernel)
            assert torch.equal(got[1], ref[1])
            torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)


def test_selective_filters_scan_the_allowed_documents(monkeypatch):
    """A filter allowing few documents is answered by scoring those alone (BlockMax.search with positions), a
    permissive one by the pruning kernel; queries the scan cannot score bit for bit like exhaustive search (a
    non-finite weight) fall back to it."""
    from sparse_retrieval.block_search import BlockMax

    gen = torch.Generator().manual_seed(26)
    docs = clustered(2000, 300, 8, gen)
    queries = queries_for(docs, 20, gen)
    index = sr.SparseIndex.from_documents(docs, block_max=True, progress=False)
    calls = []
    real = BlockMax.search
    monkeypatch.setattr(BlockMax, "search", lambda self, *a, **kw: calls.append(a[-1]) or real(self, *a, **kw))
    for share, scanned in ((0.002, True), (0.5, False)):
        mask = torch.rand(2000, generator=gen) < share
        for mode in ("exact", "safe"):
            calls.clear()
            got = index.search(queries, 6, mode=mode, filter=mask)
            assert (bool(calls) and calls[0] is not None) == scanned
            ref = sr.reference.sparse_search(queries, docs, 6, mask)
            assert torch.equal(got[1], ref[1])
            torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    mask = torch.zeros(2000, dtype=torch.bool)
    mask[:3] = True
    bad = SparseBatch(queries.indptr, queries.indices, queries.values.clone(), queries.dim)
    bad.values[0] = float("inf")
    got = index.search(bad, 6, mode="safe", filter=mask)
    assert_same(got, index.search(bad, 6, mode="exact", filter=mask.clone()))
    monkeypatch.setattr(sr.index, "_SCAN_SHARE", 0.0)
    assert_same(got, index.search(bad, 6, mode="exact", filter=mask))


def test_raw_op_checks_positions():
    gen = torch.Generator().manual_seed(27)
    docs = clustered(50, 40, 3, gen)
    bm = build_block_max(docs, torch.float32, block_size=8, progress=False)
    q = queries_for(docs, 3, gen)
    run = lambda pos: ops.block_search(q.indptr, q.indices, q.values, list(bm.tensors().values()), 8, 1, 5, 1.0, 0,
                                       1, None, pos)
    scores, ids, complete, visited = run(torch.tensor([1, 4, 9, 49]))
    assert bool(complete.all()) and visited.tolist() == [4, 4, 4]
    assert set(ids[ids >= 0].tolist()) <= set(bm.doc_ids[[1, 4, 9, 49]].tolist())
    for bad, err, match in ((torch.tensor([3, 3]), ValueError, "strictly increasing"),
                            (torch.tensor([5, 2]), ValueError, "strictly increasing"),
                            (torch.tensor([0, 50]), IndexError, r"positions: must lie in \[0, 50\)"),
                            (torch.tensor([-1, 2]), IndexError, "positions"),
                            (torch.tensor([1, 2], dtype=torch.int32), TypeError, "positions"),
                            (torch.tensor([[1, 2]]), ValueError, "positions")):
        with pytest.raises(err, match=match):
            run(bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_safe_equals_exhaustive_half_weights(simd, dtype):
    gen = torch.Generator().manual_seed(5)
    docs = clustered(2000, 3000, 12, gen, dtype=dtype)
    queries = queries_for(docs, 60, gen)
    index = sr.SparseIndex.from_documents(docs, block_max=True, block_size=16, progress=False)
    assert index.block_max.fwd_weights.dtype == dtype
    assert_same(index.search(queries, 10, mode="safe"), index.search(queries, 10, mode="exact"))


def test_wide_dimension_uses_int32_terms():
    gen = torch.Generator().manual_seed(6)
    small = clustered(400, 300, 4, gen)
    docs = SparseBatch(small.indptr, small.indices.long() * 300, small.values, 100_000)  # terms above 65535
    queries = SparseBatch(*(lambda q: (q.indptr, q.indices.long() * 300, q.values))(queries_for(small, 30, gen)),
                          100_000)
    index = sr.SparseIndex.from_documents(docs, block_max=True, block_size=8, progress=False)
    assert index.block_max.fwd_terms.dtype == torch.int32
    assert_same(index.search(queries, 7), index.search(queries, 7, mode="exact"))


@pytest.mark.parametrize("superblock", [1, 8])
def test_safe_prunes_clustered_data(superblock):
    gen = torch.Generator().manual_seed(7)
    docs = clustered(4000, 2000, 40, gen, duplicates=0.0)
    queries = queries_for(docs, 50, gen)
    index = sr.SparseIndex.from_documents(docs, block_max=True, block_size=16, superblock=superblock,
                                          progress=False)
    _, _, complete, visited = index.block_max.search(queries, 10, 1.0, 1)
    assert bool(complete[queries.row_nnz() > 0].all())
    # Reordering groups each topic's documents: a query scores a small share of the blocks.
    assert visited[complete].float().mean() < 0.25 * index.block_max.nblocks


def test_documents_added_after_optimize_are_found_then_folded_in():
    gen = torch.Generator().manual_seed(8)
    docs = clustered(900, 500, 8, gen)
    queries = queries_for(docs, 40, gen)
    index = sr.SparseIndex.from_documents(docs[:600], block_max=True, block_size=8, progress=False)
    index.add(docs[600:750])
    index.add(docs[750:])
    whole = sr.SparseIndex.from_documents(docs)
    assert_same(index.search(queries, 12, mode="safe"), whole.search(queries, 12))
    index.optimize(block_size=8, progress=False)
    assert index.block_max.ndocs == 900
    assert_same(index.search(queries, 12, mode="safe"), whole.search(queries, 12))


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_keeps_block_max_and_tail(tmp_path, mmap):
    gen = torch.Generator().manual_seed(9)
    docs = clustered(500, 300, 5, gen)
    queries = queries_for(docs, 30, gen)
    index = sr.SparseIndex.from_documents(docs[:400], block_max=True, block_size=16, progress=False)
    index.add(docs[400:])
    index.save(tmp_path / "x.sridx")
    loaded = sr.SparseIndex.load(tmp_path / "x.sridx", mmap=mmap)
    assert loaded.block_max.ndocs == 400 and len(loaded) == 500
    assert_same(loaded.search(queries, 9, mode="safe"), index.search(queries, 9, mode="exact"))


def test_version_1_files_still_load(tmp_path):
    gen = torch.Generator().manual_seed(10)
    docs = clustered(50, 60, 3, gen)
    sr.SparseIndex.from_documents(docs).save(tmp_path / "v2")
    raw = (tmp_path / "v2").read_bytes()
    magic, _, code, dim, ndocs, nseg, segment_size, nextra = struct.unpack_from("<8sIIQQQQQ", raw)
    table_crc = struct.unpack_from("<I", raw, 56)[0]
    head = struct.pack("<8sIIQQQQ", magic, 1, code, dim, ndocs, nseg, segment_size) + struct.pack("<I", table_crc)
    head = (head + struct.pack("<I", zlib.crc32(head))).ljust(64, b"\0")
    (tmp_path / "v1").write_bytes(head + raw[64:])
    v1 = sr.SparseIndex.load(tmp_path / "v1")
    assert v1.block_max is None and len(v1) == 50
    queries = queries_for(docs, 10, gen)
    assert_same(v1.search(queries, 5), sr.SparseIndex.from_documents(docs).search(queries, 5))


def test_version_2_block_max_files_load_with_rebuilt_maxima(tmp_path, monkeypatch):
    """Version 2 stored block maxima without superblocks: load keeps the forward index and rebuilds the maxima."""
    import sparse_retrieval.index as index_module

    gen = torch.Generator().manual_seed(23)
    docs = clustered(400, 120, 5, gen)
    index = sr.SparseIndex.from_documents(docs, block_max=True, block_size=4, progress=False)

    def version_2_extras(bm):
        out = {"block_max.meta": torch.tensor([bm.block_size, bm.ndocs])}
        out.update({f"block_max.{f}": getattr(bm, f) for f in ("fwd_ptr", "fwd_terms", "fwd_weights", "doc_ids",
                                                               "scale")})
        out.update({"block_max.bm_dense_row": torch.full((120,), -1), "block_max.bm_dense": torch.zeros(0, dtype=torch.uint8),
                    "block_max.bm_ptr": torch.zeros(121, dtype=torch.int64),
                    "block_max.bm_blocks": torch.zeros(0, dtype=torch.int32),
                    "block_max.bm_values": torch.zeros(0, dtype=torch.uint8)})
        return out

    with monkeypatch.context() as m:
        m.setattr(index_module, "_extras", version_2_extras)
        m.setattr(index_module, "_VERSION", 2)
        index.save(tmp_path / "v2")
    assert struct.unpack_from("<I", (tmp_path / "v2").read_bytes(), 8)[0] == 2
    loaded = sr.SparseIndex.load(tmp_path / "v2")
    assert (loaded.block_max.block_size, loaded.block_max.superblock) == (4, 1)
    assert torch.equal(loaded.block_max.sb_values, index.block_max.sb_values)
    assert torch.equal(loaded.block_max.sb_dense, index.block_max.sb_dense)
    queries = queries_for(docs, 30, gen)
    assert_same(loaded.search(queries, 6, mode="safe"), index.search(queries, 6, mode="exact"))


@pytest.mark.parametrize("superblock", [1, 4])
def test_approximate_recall_grows_with_alpha(superblock):
    gen = torch.Generator().manual_seed(11)
    docs = clustered(3000, 1500, 30, gen, duplicates=0.0)
    queries = queries_for(docs, 80, gen)
    index = sr.SparseIndex.from_documents(docs, block_max=True, block_size=16, superblock=superblock,
                                          progress=False)
    exact = index.search(queries, 10, mode="exact")[1]
    previous, means = None, []
    for alpha in (0.2, 0.4, 0.6, 0.8, 0.9, 1.0):
        ids = index.search(queries, 10, mode="approximate", alpha=alpha)[1]
        per_query = torch.tensor([len(set(a.tolist()) & set(b.tolist()) - {-1}) / max(1, int((b >= 0).sum()))
                                  for a, b in zip(ids, exact)])
        if previous is not None:  # blocks scored at a smaller alpha are a prefix of those at a larger one
            assert bool((per_query >= previous).all())
        previous = per_query
        means.append(float(per_query.mean()))
    assert means[-1] == 1.0 and means[0] < 1.0


def test_bad_parameters_raise():
    gen = torch.Generator().manual_seed(12)
    docs = clustered(100, 50, 3, gen)
    queries = queries_for(docs, 5, gen)
    plain = sr.SparseIndex.from_documents(docs)
    with pytest.raises(ValueError, match="optimize"):
        plain.search(queries, 3, mode="safe")
    index = sr.SparseIndex.from_documents(docs, block_max=True, block_size=4, progress=False)
    with pytest.raises(ValueError, match="mode"):
        index.search(queries, 3, mode="fast")
    for alpha in (0, -0.5, 1.5, float("nan"), "x", True):
        with pytest.raises(ValueError, match="alpha"):
            index.search(queries, 3, mode="approximate", alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        index.search(queries, 3, mode="safe", alpha=0.5)
    for cut in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="query_cut"):
            index.search(queries, 3, mode="approximate", query_cut=cut)
    with pytest.raises(ValueError, match="query_cut"):
        index.search(queries, 3, mode="safe", query_cut=3)
    with pytest.raises(ValueError, match="block_size"):
        sr.SparseIndex.from_documents(docs, block_max=True, block_size=0, progress=False)
    for superblock in (0, 1025, 2.0, "big"):
        with pytest.raises(ValueError, match="superblock"):
            index.optimize(superblock=superblock, progress=False)


def test_auto_superblock_follows_collection_size(monkeypatch):
    import sparse_retrieval.block_search as bs

    gen = torch.Generator().manual_seed(25)
    docs = clustered(300, 100, 4, gen)
    queries = queries_for(docs, 20, gen)
    assert sr.SparseIndex.from_documents(docs, block_max=True, progress=False).block_max.superblock == 1
    monkeypatch.setattr(bs, "AUTO_SUPERBLOCK_DOCS", 300)
    index = sr.SparseIndex.from_documents(docs, block_max=True, progress=False)
    assert index.block_max.superblock == 2
    assert_same(index.search(queries, 5), index.search(queries, 5, mode="exact"))
    negative = SparseBatch(docs.indptr, docs.indices, -docs.values, docs.dim)
    with pytest.raises(ValueError, match="non-negative"):
        sr.SparseIndex.from_documents(negative, block_max=True, progress=False)


def test_nonfinite_unsorted_and_dense_queries_fall_back_to_exhaustive():
    gen = torch.Generator().manual_seed(13)
    docs = clustered(200, 80, 4, gen)
    index = sr.SparseIndex.from_documents(docs, block_max=True, block_size=8, progress=False)
    q = SparseBatch(torch.tensor([0, 2, 4]), torch.tensor([1, 5, 2, 9], dtype=torch.int32),
                    torch.tensor([float("inf"), 1.0, float("nan"), 2.0]), 80, check=False)
    got, want = index.search(q, 4, mode="safe"), index.search(q, 4, mode="exact")
    torch.testing.assert_close(got[0], want[0], equal_nan=True)
    assert torch.equal(got[1], want[1])
    bm = index.block_max
    unsorted = SparseBatch(torch.tensor([0, 2]), torch.tensor([9, 1], dtype=torch.int32), torch.ones(2), 80,
                           check=False)
    assert not bool(bm.search(unsorted, 3, 1.0, 1)[2].any())  # the raw op leaves it to exhaustive search
    wide = SparseBatch(torch.tensor([0, 80]), torch.arange(80, dtype=torch.int32), torch.rand(80) + 0.1, 80)
    assert_same(index.search(wide, 5, mode="safe"), index.search(wide, 5, mode="exact"))


def test_queries_with_more_than_255_terms_are_answered_exhaustively():
    gen = torch.Generator().manual_seed(18)
    docs = clustered(300, 1000, 4, gen)
    index = sr.SparseIndex.from_documents(docs, block_max=True, block_size=8, progress=False)
    cols = torch.randperm(1000, generator=gen)[:400].sort().values
    q = SparseBatch(torch.tensor([0, 400, 655]), torch.cat([cols, cols[:255]]).int(), torch.rand(655) + 0.1, 1000)
    complete = index.block_max.search(q, 5, 1.0, 1)[2]
    assert complete.tolist() == [False, True]
    assert_same(index.search(q, 5, mode="safe"), index.search(q, 5, mode="exact"))


def test_raw_op_rejects_inconsistent_structures():
    gen = torch.Generator().manual_seed(14)
    docs = clustered(100, 50, 3, gen)
    bm = build_block_max(docs, torch.float32, block_size=8, superblock=2, dense_fraction=0.5, progress=False)
    assert bm.sb_ids.numel() > 0
    q = queries_for(docs, 3, gen)
    args = dict(bm.tensors())

    def call(**change):
        a = dict(args, **change)
        return ops.block_search(q.indptr, q.indices, q.values, list(a.values()), 8, 2, 3, 1.0, 0, 1)

    call()
    bad = {"fwd_ptr": args["fwd_ptr"][:-1], "fwd_weights": args["fwd_weights"][:-1],
           "doc_ids": args["doc_ids"].int(), "scale": args["scale"][:-1], "sb_values": args["sb_values"][:-1],
           "sb_dense_row": torch.full_like(args["sb_dense_row"], 10**6), "sb_ptr": args["sb_ptr"] + 1,
           "sb_dense": torch.zeros(args["sb_dense"].numel() + 1, dtype=torch.uint8),
           "blk_ptr": args["blk_ptr"][:-1], "blk_terms": args["blk_terms"].int(),
           "blk_values": args["blk_values"][:-1]}
    for name, value in bad.items():
        with pytest.raises((ValueError, TypeError), match=name):
            call(**{name: value})
    a = list(args.values())
    for pos, value, name in [(7, 1.5, "alpha"), (8, -1, "query_cut"), (4, 0, "block_size"), (5, 0, "superblock"),
                             (5, 2000, "superblock"), (6, -1, "k"), (6, 2**31, "k"),
                             (4, 4, "sb_dense")]:  # sizes that do not fit
        params = [8, 2, 3, 1.0, 0, 1]
        params[pos - 4] = value
        with pytest.raises(ValueError, match=name):
            ops.block_search(q.indptr, q.indices, q.values, a, *params)
    with pytest.raises(ValueError, match="13 tensors"):
        ops.block_search(q.indptr, q.indices, q.values, a[:12], 8, 2, 3, 1.0, 0, 1)
    with pytest.raises(TypeError, match="q_values: expected a tensor, got None"):
        ops.block_search(q.indptr, q.indices, None, a, 8, 2, 3, 1.0, 0, 1)
    with pytest.raises(ValueError, match="k: must lie in"):  # the fake checks it too
        ops.block_search(*(t.to("meta") for t in (q.indptr, q.indices, q.values)), [t.to("meta") for t in a],
                         8, 2, -3, 1.0, 0, 1)


def damage_cases(bm):
    """(field, in-place damage, message) for the offset and id arrays block_search indexes with, and the weights and
    scales its pruning relies on."""
    last_sparse = int((bm.sb_ptr.diff() > 0).nonzero().max())
    return [
        ("fwd_ptr", lambda t: t.__setitem__(3, t[2] - 1), "fwd_ptr: offsets"),
        ("fwd_ptr", lambda t: t.__setitem__(3, 10**9), "fwd_ptr: offsets"),
        ("fwd_terms", lambda t: t.__setitem__(0, 10**4), "fwd_terms: list"),
        ("fwd_terms", lambda t: t.__setitem__(0, -3), "fwd_terms: list"),
        ("fwd_terms", lambda t: t.__setitem__(1, t[0]), "fwd_terms: list"),
        ("sb_ids", lambda t: t.__setitem__(-1, 10**6), "sb_ids: list"),
        ("sb_ids", lambda t: t.__setitem__(-1, -1), "sb_ids: list"),
        ("sb_ptr", lambda t: t.__setitem__(last_sparse, 10**9), "sb_ptr: offsets"),
        ("sb_dense_row", lambda t: t.__setitem__(0, 10**6), "sb_dense_row"),
        ("blk_ptr", lambda t: t.__setitem__(1, 10**9), "blk_ptr: offsets"),
        ("blk_terms", lambda t: t.__setitem__(1, t[0]), "blk_terms: list"),
        ("blk_terms", lambda t: t.__setitem__(0, 10**4), "blk_terms: list"),
        ("fwd_weights", lambda t: t.__setitem__(2, -0.5), "fwd_weights: must be finite and non-negative"),
        ("fwd_weights", lambda t: t.__setitem__(2, float("nan")), "fwd_weights: must be finite and non-negative"),
        ("fwd_weights", lambda t: t.__setitem__(-1, float("inf")), "fwd_weights: must be finite and non-negative"),
        ("scale", lambda t: t.__setitem__(0, 0.0), "scale: must be finite and > 0"),
        ("scale", lambda t: t.__setitem__(-1, float("nan")), "scale: must be finite and > 0"),
        # finite and positive, but below a weight / 255: safe search pruned it and said complete
        ("scale", lambda t: t.__setitem__(slice(None), 1e-30), "scale: must be at least each term's largest"),
        ("fwd_weights", lambda t: t.__setitem__(0, 3e38), "scale: must be at least each term's largest"),
    ]


def test_raw_op_checks_index_contents():
    """Crafted offsets and ids raise naming the array, also when changed in place (through torch) after a search
    that checked them."""
    gen = torch.Generator().manual_seed(16)
    docs = clustered(150, 60, 3, gen)
    q = queries_for(docs, 4, gen)
    bm = build_block_max(docs, torch.float32, block_size=8, superblock=2, progress=False)
    for field, damage, match in damage_cases(bm):
        fresh = build_block_max(docs, torch.float32, block_size=8, superblock=2, progress=False)
        fresh.search(q, 3, 1.0, 1)
        changed = dict(fresh.tensors())
        changed[field] = changed[field].clone()
        damage(changed[field])
        with pytest.raises((ValueError, IndexError), match=match):
            ops.block_search(q.indptr, q.indices, q.values, list(changed.values()), 8, 2, 3, 1.0, 0, 1)
        damage(getattr(fresh, field))
        with pytest.raises((ValueError, IndexError), match=match):
            fresh.search(q, 3, 1.0, 1)


@pytest.mark.parametrize("field, value", [("fwd_ptr", 10**12), ("fwd_ptr", -4), ("sb_ids", 10**6),
                                          ("sb_ids", -2), ("sb_ptr", 10**12), ("sb_dense_row", 10**6),
                                          ("blk_ptr", 10**12), ("blk_ptr", -1)])
def test_raw_op_survives_changes_behind_torchs_back(field, value):
    """Numpy writes do not move the version counter; the kernel's own bounds turn them into an error."""
    gen = torch.Generator().manual_seed(17)
    docs = clustered(150, 60, 3, gen)
    bm = build_block_max(docs, torch.float32, block_size=8, superblock=2, progress=False)
    every = SparseBatch(torch.tensor([0, 60]), torch.arange(60, dtype=torch.int32), torch.rand(60) + 0.1, 60)
    bm.search(every, 3, 1.0, 1)
    arr = getattr(bm, field).numpy()
    arr[1:-1] = value
    with pytest.raises(ValueError, match="changed after it was checked"):
        bm.search(every, 3, 1.0, 1)


def test_validate_rejects_damaged_structures():
    gen = torch.Generator().manual_seed(15)
    docs = clustered(120, 50, 3, gen)
    good = build_block_max(docs, torch.float32, block_size=8, progress=False)
    validate_block_max(good, 50, "x")
    for field, damage in [("fwd_terms", lambda t: t.fill_(60)), ("doc_ids", lambda t: t.fill_(0)),
                          ("sb_ids", lambda t: t.fill_(10**6)), ("fwd_weights", lambda t: t.fill_(-1.0)),
                          ("fwd_ptr", lambda t: t.flip(0)), ("blk_terms", lambda t: t.flip(0)),
                          ("blk_values", lambda t: t[:-1]), ("blk_ptr", lambda t: t[:-1])]:
        bm = build_block_max(docs, torch.float32, block_size=8, superblock=2, dense_fraction=1.0, progress=False)
        assert bm.sb_ids.numel() > 0
        t = getattr(bm, field)
        setattr(bm, field, damage(t.clone()))
        with pytest.raises(ValueError):
            validate_block_max(bm, 50, "x")


def test_cluster_order_is_a_permutation_that_groups_topics():
    gen = torch.Generator().manual_seed(16)
    docs = clustered(600, 600, 10, gen, duplicates=0.0)
    order = cluster_order(docs, leaf=16, progress=False)
    assert torch.equal(torch.sort(order).values, torch.arange(600))
    # neighbours in the order share more terms than random pairs
    dense = docs.to_dense() > 0
    overlap = lambda a, b: float((dense[a] & dense[b]).sum(1).float().mean())
    assert overlap(order[:-1], order[1:]) > 2 * overlap(torch.arange(599), torch.randperm(600, generator=gen)[:599])


def test_opcheck():
    gen = torch.Generator().manual_seed(17)
    docs = clustered(64, 40, 3, gen)
    bm = build_block_max(docs, torch.float32, block_size=8, progress=False)
    q = queries_for(docs, 4, gen)
    for superblock in (1, 3):
        bm = build_block_max(docs, torch.float32, block_size=8, superblock=superblock, progress=False)
        torch.library.opcheck(ops.block_search, (q.indptr, q.indices, q.values, list(bm.tensors().values()), 8,
                                                 superblock, 5, 1.0, 0, 1))
        torch.library.opcheck(ops.block_search, (q.indptr, q.indices, q.values, list(bm.tensors().values()), 8,
                                                 superblock, 5, 1.0, 0, 1, None, torch.tensor([0, 5, 63])))
        torch.library.opcheck(ops.block_maxima, (bm.fwd_ptr, bm.fwd_terms, bm.fwd_weights, 40, 8, superblock, 0.125))


def tight(bound, scale, true):
    assert bool((bound * scale >= true).all())
    assert bool(((bound - 1).clamp(min=0) * scale < true)[true > 0].all())  # one step lower would not bound
    assert bool((bound[true == 0] == 0).all())


def test_block_maxima_are_tight_upper_bounds(simd):
    gen = torch.Generator().manual_seed(19)
    docs = clustered(203, 90, 5, gen, dtype=torch.bfloat16)
    bm = build_block_max(docs, torch.bfloat16, block_size=6, superblock=3, dense_fraction=0.3, progress=False)
    fwd = SparseBatch(bm.fwd_ptr, bm.fwd_terms.int(), bm.fwd_weights, 90, check=False).to_dense().float()

    def true_max(group):  # (groups, dim)
        return torch.nn.functional.pad(fwd, (0, 0, 0, -len(docs) % group)).view(-1, group, 90).amax(1)

    # superblocks, term-major: dense rows and sparse entries
    bound = torch.zeros(bm.nsuper, 90)
    dense_terms = (bm.sb_dense_row >= 0).nonzero().flatten()
    assert 0 < dense_terms.numel() < 90
    bound[:, dense_terms] = bm.sb_dense.view(-1, bm.nsuper)[bm.sb_dense_row[dense_terms]].T.float()
    for t in (bm.sb_dense_row < 0).nonzero().flatten().tolist():
        a, b = bm.sb_ptr[t], bm.sb_ptr[t + 1]
        bound[bm.sb_ids[a:b].long(), t] = bm.sb_values[a:b].float()
    tight(bound, bm.scale, true_max(18))
    # blocks, superblock-major (the last superblock has 2 of 3 blocks: its third bound is 0)
    assert bm.nblocks == 34 and bm.nsuper == 12
    bound = torch.zeros(bm.nsuper * 3, 90)
    values = bm.blk_values.view(-1, 3).float()
    for s in range(bm.nsuper):
        a, b = bm.blk_ptr[s], bm.blk_ptr[s + 1]
        assert bool((bm.blk_terms[a:b].diff() > 0).all())
        bound[3 * s:3 * s + 3, bm.blk_terms[a:b].long()] = values[a:b].T
    tight(bound[:34], bm.scale, true_max(6))
    assert bool((bound[34:] == 0).all())


def test_block_maxima_op_checks_its_inputs():
    gen = torch.Generator().manual_seed(20)
    docs = clustered(50, 40, 3, gen)
    ptr, terms, w = docs.indptr, docs.indices.short(), docs.values
    for args, match in [((ptr, terms, w, 30, 4, 2, 0.1), "fwd_terms"), ((ptr, terms, -w, 40, 4, 2, 0.1), "fwd_weights"),
                        ((ptr.flip(0), terms, w, 40, 4, 2, 0.1), "fwd_ptr"),
                        ((ptr, terms, w, 40, 0, 2, 0.1), "block_size"), ((ptr, terms, w, 40, 4, 0, 0.1), "superblock"),
                        ((ptr, terms, w, 40, 4, 2, 0.0), "dense_fraction"),
                        ((ptr, terms, w[:-1], 40, 4, 2, 0.1), "fwd_weights")]:
        with pytest.raises((ValueError, IndexError, TypeError), match=match):
            ops.block_maxima(*args)


@pytest.mark.parametrize("superblock", [1, 4])
def test_query_cut_bounds_with_the_heaviest_terms_only(simd, superblock):
    gen = torch.Generator().manual_seed(21)
    docs = clustered(3000, 1500, 30, gen, duplicates=0.0)
    queries = queries_for(docs, 80, gen)
    index = sr.SparseIndex.from_documents(docs, block_max=True, block_size=8, superblock=superblock,
                                          progress=False)
    exact = index.search(queries, 10, mode="exact")
    # a cut at least as long as every query changes nothing
    assert_same(index.search(queries, 10, mode="approximate", alpha=1.0, query_cut=1000), exact)
    recalls = []
    for cut in (1, 3, 1000):
        ids = index.search(queries, 10, mode="approximate", alpha=1.0, query_cut=cut)[1]
        got = index.block_max.search(queries, 10, 1.0, 1, cut)
        assert torch.equal(got[1][got[2]], ids[got[2]])
        recalls.append(float(torch.tensor([len(set(a.tolist()) & set(b.tolist()) - {-1}) / max(1, int((b >= 0).sum()))
                                           for a, b in zip(ids, exact[1])]).mean()))
    assert recalls[0] < 1.0 and recalls[-1] == 1.0 and recalls[0] <= recalls[1] + 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_optimized_index_on_cuda_searches_exactly_by_default():
    gen = torch.Generator().manual_seed(22)
    docs = clustered(300, 200, 4, gen)
    queries = queries_for(docs, 10, gen)
    index = sr.SparseIndex.from_documents(docs, block_max=True, progress=False)
    gpu = index.to("cuda")
    got = gpu.search(queries.cuda(), 5)
    want = index.search(queries, 5, mode="exact")
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="CPU"):
        gpu.search(queries.cuda(), 5, mode="safe")


def test_groups_of_documents_without_terms():
    """More than a leaf's worth of empty documents in one group (nothing to cluster on) used to fail to build."""
    docs = SparseBatch.from_lists([([], [])] * 20 + [([3], [1.0])] + [([], [])] * 5, 10)
    index = sr.SparseIndex.from_documents(docs, block_max=True, block_size=2, progress=False)
    q = SparseBatch.from_lists([([3], [2.0]), ([], [])], 10)
    assert_same(index.search(q, 4, mode="safe"), index.search(q, 4, mode="exact"))


def test_save_load_with_no_sparse_block_maxima(tmp_path):
    """Every term in every block: the sparse block-max arrays are empty and were placed past the file's end,
    which load took for a truncation."""
    docs = SparseBatch.from_lists([([0, 1], [1.0, 2.0]), ([0, 1], [3.0, 1.0])] * 4, 2)
    index = sr.SparseIndex.from_documents(docs, block_max=True, block_size=2, progress=False)
    assert index.block_max.sb_ids.numel() == 0
    index.save(tmp_path / "x.sridx")
    q = SparseBatch.from_lists([([0], [1.0])], 2)
    assert_same(sr.SparseIndex.load(tmp_path / "x.sridx").search(q, 3), index.search(q, 3))


def test_optimize_with_a_given_order():
    """A reordering of the user's own (or an earlier build's) replaces the clustering; ids stay the user's."""
    gen = torch.Generator().manual_seed(24)
    docs = clustered(500, 200, 6, gen)
    queries = queries_for(docs, 30, gen)
    index = sr.SparseIndex.from_documents(docs, block_max=True, block_size=4, progress=False)
    again = sr.SparseIndex.from_documents(docs, block_max=True, block_size=4, superblock=5,
                                          order=index.block_max.doc_ids, progress=False)
    assert torch.equal(again.block_max.doc_ids, index.block_max.doc_ids)
    reverse = torch.arange(499, -1, -1)
    index.optimize(block_size=4, order=reverse, progress=False)
    assert torch.equal(index.block_max.doc_ids, reverse)
    exact = index.search(queries, 8, mode="exact")
    assert_same(index.search(queries, 8, mode="safe"), exact)
    assert_same(again.search(queries, 8, mode="safe"), exact)
    for bad in (torch.zeros(500, dtype=torch.long), torch.arange(499), torch.arange(500.0), reverse + 1):
        with pytest.raises(ValueError, match="order"):
            index.optimize(order=bad, progress=False)


