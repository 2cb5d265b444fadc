"""Term lists (SparseIndex approximate search after Seismic, term_lists.py): with every posting listed, full
summaries, every query term and alpha = 1 the results equal exhaustive search bit for bit (random, clustered and
tied data of awkward sizes, every SIMD level, threads, filters, after add, save/load and compact, over a huge dim);
recall only grows with alpha; bad parameters and damaged structures raise."""
import pytest
import torch

import sparse_retrieval as sr
from sparse_retrieval.block_search import build_block_max
from sparse_retrieval.sparse import SparseBatch
from sparse_retrieval.term_lists import build_term_lists

from test_block_search import assert_same, clustered, queries_for
from test_compact_terms import spread

ops = torch.ops.sparse_retrieval
EVERYTHING = dict(list_len=65536, summary_energy=1.0)
ALL_TERMS = 1 << 20


def data(n, seed, kind="clustered", dim=300):
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        docs = SparseBatch(*(lambda b: (b.indptr, b.indices, b.values.abs()))(
            __import__("test_sparse_dot").random_batch(n, dim, 40, gen)), dim)
    else:
        docs = clustered(n, dim, 6, gen, coarse=kind == "coarse")
    return docs, queries_for(docs, 40, gen, negative=kind == "random")


@pytest.mark.parametrize("n,block_size,group,k", [(1, 1, 1, 1), (97, 8, 3, 5), (777, 7, 10, 40), (1500, 16, 64, 10),
                                                  (300, 8, 1, 400)])
@pytest.mark.parametrize("kind", ["random", "clustered", "coarse"])
def test_everything_listed_is_exact(simd, n, block_size, group, k, kind):
    docs, queries = data(n, n + group, kind)
    index = sr.SparseIndex.from_documents(docs, block_max=True, block_size=block_size, progress=False,
                                          term_lists=dict(EVERYTHING, group=group))
    exact = index.search(queries, k, mode="exact")
    for threads in (1, 3):
        assert_same(index.search(queries, k, threads, mode="approximate", alpha=1.0, query_cut=ALL_TERMS), exact)
    assert_same(index.search(queries, k, mode="safe"), exact)  # safe search ignores the lists


def test_recall_grows_with_alpha_and_query_cut():
    docs, queries = data(3000, 5, dim=500)
    index = sr.SparseIndex.from_documents(docs, block_max=True, progress=False,
                                          term_lists=dict(list_len=200, group=8, summary_energy=0.5))
    exact = index.search(queries, 10, mode="exact")[1]

    def recall(**kw):
        ids = index.search(queries, 10, mode="approximate", **kw)[1]
        return [len(set(a.tolist()) & set(b.tolist()) - {-1}) for a, b in zip(ids, exact)]

    previous = None
    for alpha in (0.3, 0.8, 1.0, 1.2, 1.5, 3.0):
        now = recall(alpha=alpha)
        if previous is not None:  # per query: the groups scored for a larger alpha include those of a smaller
            assert all(a >= b for a, b in zip(now, previous)), alpha
        previous = now
    assert sum(recall(alpha=0.3)) < sum(recall(alpha=3.0))
    assert sum(recall(query_cut=1)) < sum(recall(query_cut=16))
    # the groups scored grow with alpha, query by query (raw op: fourth output)
    bm = index.block_max
    visited = [bm.search(queries, 10, alpha, 1, 8, lists=True)[3] for alpha in (0.5, 1.0, 2.0)]
    assert bool((visited[0] <= visited[1]).all() and (visited[1] <= visited[2]).all())


def test_filters_deletes_add_save_load_compact(tmp_path):
    docs, queries = data(900, 8)
    more, _ = data(130, 9)
    index = sr.SparseIndex.from_documents(docs, block_max=True, term_lists=EVERYTHING, progress=False)
    index.add(more)  # a tail outside the lists, searched exhaustively
    index.delete(torch.arange(0, 1030, 7))

    gone = torch.arange(0, 1030, 7)
    keep = torch.rand(1030, generator=torch.Generator().manual_seed(1)) < 0.6
    keep[gone] = False  # compact() forgets deleted ids: a filter must not name them afterwards
    allowed = keep.nonzero().flatten()
    run = lambda ix, mode, **kw: ix.search(queries, 10, mode=mode, filter=allowed, **kw)
    approx = dict(alpha=1.0, query_cut=ALL_TERMS)
    exact = run(index, "exact")
    assert_same(run(index, "approximate", **approx), exact)
    assert bool(((exact[1] % 7 != 0) | (exact[1] < 0)).all())
    index.save(tmp_path / "a.idx")
    for mmap in (True, False):
        loaded = sr.SparseIndex.load(tmp_path / "a.idx", mmap=mmap)
        assert loaded.block_max.lists is not None
        assert_same(run(loaded, "approximate", **approx), exact)
    index.compact(progress=False)  # rebuilds the lists with the same parameters
    assert index.block_max.lists.list_len == 65536 and index.block_max.lists.summary_energy == 1.0
    assert_same(run(index, "approximate", **approx), exact)


def test_huge_dim():
    docs, queries = data(400, 12, dim=200)
    small = sr.SparseIndex.from_documents(docs, block_max=True, term_lists=EVERYTHING, progress=False)
    big = sr.SparseIndex.from_documents(spread(docs), block_max=True, term_lists=EVERYTHING, progress=False)
    approx = dict(mode="approximate", alpha=1.0, query_cut=ALL_TERMS)
    assert_same(big.search(spread(queries), 10, **approx), small.search(queries, 10, **approx))
    assert_same(big.search(spread(queries), 10, **approx), small.search(queries, 10, mode="exact"))


def test_bad_parameters_raise():
    docs, queries = data(200, 13)
    with pytest.raises(ValueError, match="block_max=True"):
        sr.SparseIndex.from_documents(docs, term_lists=True, progress=False)
    index = sr.SparseIndex.from_documents(docs, block_max=True, progress=False)
    before = index.block_max
    for spec, match in ((dict(list_len=0), "list_len"), (dict(list_len=70000), "list_len"), (dict(group=0), "group"),
                        (dict(summary_energy=0.0), "summary_energy"), (dict(summary_energy=1.5), "summary_energy"),
                        (dict(doc_cut=0), "doc_cut"), (dict(list_len=2.5), "list_len"), (dict(size=3), "unknown")):
        with pytest.raises(ValueError, match=match):
            index.optimize(term_lists=spec, progress=False)
    with pytest.raises(ValueError, match="list_len"):
        index.optimize(term_lists=dict(list_len="big"), progress=False)
    with pytest.raises(TypeError, match="term_lists"):
        index.optimize(term_lists="yes", progress=False)
    assert index.block_max is before  # refused before the (long) rebuild
    with pytest.raises(ValueError, match=r"alpha: expected a number in \(0, 1\]"):  # no lists: block maxima
        index.search(queries, 5, mode="approximate", alpha=1.2)
    index.optimize(term_lists=True, progress=False)
    for alpha in (0.0, 16.5, True):
        with pytest.raises(ValueError, match=r"alpha: expected a number in \(0, 16\]"):
            index.search(queries, 5, mode="approximate", alpha=alpha)
    index.search(queries, 5, mode="approximate", alpha=16.0)


def test_auto_list_len():
    from sparse_retrieval.term_lists import auto_list_len
    assert auto_list_len(1) == auto_list_len(2_000_000) == 2000
    assert 6400 < auto_list_len(8_841_823) < 6700 and auto_list_len(10**12) == 65536
    docs, _ = data(100, 17)
    index = sr.SparseIndex.from_documents(docs, block_max=True, term_lists=True, progress=False)
    assert index.block_max.lists.list_len == 2000


def raw(docs):
    bm = build_block_max(docs, torch.float32, block_size=8, superblock=1, progress=False)
    return bm, build_term_lists(bm, **EVERYTHING)


def test_raw_op_checks_its_inputs():
    docs, queries = data(300, 14)
    bm, tl = raw(docs)
    q = queries
    call = lambda lists, alpha=1.0, positions=None: ops.block_search(
        q.indptr, q.indices, q.values, list(bm.tensors().values()), 8, 1, 5, alpha, 0, 1, None, positions, lists)
    call(tl.tensors())
    with pytest.raises(ValueError, match="lists: expected none or 13 tensors"):
        call(tl.tensors()[:9])
    with pytest.raises(ValueError, match="alpha"):
        call(tl.tensors(), alpha=17.0)
    with pytest.raises(ValueError, match="positions: not with lists"):
        call(tl.tensors(), positions=torch.tensor([0, 1]))
    damaged = [
        (2, lambda t: t.fill_(10**6), "group_docs"),                  # documents out of range
        (2, lambda t: t.flip(0), "group_docs"),                       # not ascending
        (4, lambda t: t.flip(0), "dir_terms"),                        # summary terms not ascending
        (0, lambda t: t[1:].fill_(0), "list_ptr"),                    # offsets not ending at the group count
        (5, lambda t: t.float(), "dir_at"),                           # wrong dtype
        (7, lambda t: t[:-1], "ent_values|ent_steps"),                # lengths differ
        (10, lambda t: t.flip(0), "one_terms"),                       # single terms not ascending
        (9, lambda t: t[1:].fill_(0), "one_ptr"),                     # offsets not ending at the single count
        (11, lambda t: t[:-1], "one_groups"),                         # lengths differ
        (10, lambda t: t.int(), "one_terms"),                         # not the forward index's term type
    ]
    for i, damage, match in damaged:
        lists = [t.clone() for t in tl.tensors()]
        out = damage(lists[i])
        if out is not None:
            lists[i] = out.contiguous()
        with pytest.raises((ValueError, IndexError, TypeError), match=match):
            call(lists)
    for args, match in (((0, 10, 0.6, 15), "list_len"), ((10, 0, 0.6, 15), "group"), ((10, 10, 0.0, 15), "summary"),
                        ((10, 10, 0.6, 0), "doc_cut")):
        with pytest.raises(ValueError, match=match):
            ops.term_lists(bm.fwd_ptr, bm.fwd_terms, bm.fwd_weights, bm.scale, *args)
    with pytest.raises(ValueError, match="scale"):
        ops.term_lists(bm.fwd_ptr, bm.fwd_terms, bm.fwd_weights, bm.scale / 1000, 10, 10, 0.6, 15)


def test_damaged_file_raises(tmp_path):
    docs, _ = data(200, 15)
    index = sr.SparseIndex.from_documents(docs, block_max=True, term_lists=True, progress=False)
    path = tmp_path / "a.idx"
    index.save(path)
    bm = index.block_max
    bm.lists.group_docs = bm.lists.group_docs.flip(0).contiguous()  # written as it is: the reader must notice
    index.save(tmp_path / "b.idx")
    with pytest.raises(ValueError, match="term lists"):
        sr.SparseIndex.load(tmp_path / "b.idx")
    sr.SparseIndex.load(path)


def test_opcheck():
    docs, queries = data(64, 16, dim=40)
    bm, tl = raw(docs)
    q = queries[:4]
    torch.library.opcheck(ops.block_search, (q.indptr, q.indices, q.values, list(bm.tensors().values()), 8, 1, 5,
                                             1.2, 3, 1, None, None, tl.tensors()))
    torch.library.opcheck(ops.term_lists, (bm.fwd_ptr, bm.fwd_terms, bm.fwd_weights, bm.scale, 16, 4, 0.5, 15))


def old_layout(tl):
    """The arrays of ``tl`` as files wrote them before single entries were kept apart: every term of a list in the
    directory, entries with 16-bit group numbers (no fillers)."""
    out = {name: [] for name in ("dir_ptr", "dir_terms", "dir_at", "ent_ptr", "ent_groups", "ent_values")}
    dir_ptr, ent_ptr = [0], [0]
    for t in range(tl.list_ptr.numel() - 1):
        runs = []
        d0, d1, e0, e1 = (int(x) for x in (tl.dir_ptr[t], tl.dir_ptr[t + 1], tl.ent_ptr[t], tl.ent_ptr[t + 1]))
        for j in range(d0, d1):
            a, b = e0 + int(tl.dir_at[j]), (e0 + int(tl.dir_at[j + 1]) if j + 1 < d1 else e1)
            steps, values = tl.ent_steps[a:b].tolist(), tl.ent_values[a:b].tolist()
            groups = torch.tensor(steps).cumsum(0).tolist()
            kept = [i for i in range(b - a) if (steps[i], values[i]) != (255, 0)]
            runs.append((int(tl.dir_terms[j]), [groups[i] for i in kept], [values[i] for i in kept]))
        for o in range(int(tl.one_ptr[t]), int(tl.one_ptr[t + 1])):
            runs.append((int(tl.one_terms[o]), [int(tl.one_groups[o])], [int(tl.one_values[o])]))
        at = 0
        for term, groups, values in sorted(runs):
            out["dir_terms"].append(term)
            out["dir_at"].append(at)
            out["ent_groups"] += groups
            out["ent_values"] += values
            at += len(groups)
        dir_ptr.append(dir_ptr[-1] + len(runs))
        ent_ptr.append(ent_ptr[-1] + at)
    arrays = {"list_ptr": tl.list_ptr, "group_ptr": tl.group_ptr, "group_docs": tl.group_docs,
              "dir_ptr": torch.tensor(dir_ptr), "dir_terms": torch.tensor(out["dir_terms"], dtype=tl.dir_terms.dtype),
              "dir_at": torch.tensor(out["dir_at"], dtype=torch.int32), "ent_ptr": torch.tensor(ent_ptr),
              "ent_groups": torch.tensor(out["ent_groups"], dtype=torch.int16),
              "ent_values": torch.tensor(out["ent_values"], dtype=torch.uint8)}
    return arrays


def fillers(tl):
    return int(((tl.ent_steps == 255) & (tl.ent_values == 0)).sum())


@pytest.mark.parametrize("list_len,group,energy", [(80, 4, 0.8), (2000, 1, 0.5)])
def test_old_files_load(tmp_path, monkeypatch, list_len, group, energy):
    """Files written before single entries were kept apart list every term in the directory, and files before
    version 6 hold 16-bit group numbers; they load (converted to steps, with fillers where a step exceeds 255, as
    lists of hundreds of groups need), with the same results."""
    import sparse_retrieval.index as index_module

    docs, queries = data(600, 17) if group > 1 else data(2000, 17, dim=60)  # lists of hundreds of groups
    index = sr.SparseIndex.from_documents(docs, block_max=True, progress=False,
                                          term_lists={"list_len": list_len, "group": group, "summary_energy": energy})
    lists = index.block_max.lists
    assert lists.one_terms.numel() > 0 and lists.dir_terms.numel() > 0
    saved = index_module._extras

    def old_extras(bm):
        out = {k: v for k, v in saved(bm).items() if not k.startswith("term_lists.") or k == "term_lists.meta"}
        out.update({f"term_lists.{k}": v for k, v in old_layout(bm.lists).items()})
        return out

    with monkeypatch.context() as m:
        m.setattr(index_module, "_extras", old_extras)
        index.save(tmp_path / "old")
    loaded = sr.SparseIndex.load(tmp_path / "old")
    # Converted a run of terms at a time: runs of a few dozen entries give the same arrays.
    import sparse_retrieval.term_lists as term_lists_module
    with monkeypatch.context() as m:
        m.setattr(term_lists_module, "_CONVERT_ENTRIES", 37)
        piecewise = sr.SparseIndex.load(tmp_path / "old").block_max.lists
    for a, b in zip(piecewise.tensors(), loaded.block_max.lists.tensors()):
        assert torch.equal(a, b)
    assert loaded.block_max.lists.one_terms.numel() == 0
    assert (fillers(loaded.block_max.lists) > 0) == (group == 1) and (fillers(lists) > 0) == (group == 1)
    assert loaded.block_max.lists.dir_terms.numel() == lists.dir_terms.numel() + lists.one_terms.numel()
    for alpha in (0.9, 1.1, 2.0):
        assert_same(loaded.search(queries, 10, mode="approximate", alpha=alpha),
                    index.search(queries, 10, mode="approximate", alpha=alpha))


@pytest.mark.parametrize("list_len,group,energy", [(40, 3, 0.6), (200, 1, 0.5), (9, 2, 1.0), (2000, 1, 0.5)])
def test_kernel_equals_reference(simd, list_len, group, energy):
    """The kernel takes the groups and stops as reference.list_search does, at any setting: the same groups
    scored (thousands of candidates a query at group 1: ordered a slice at a time), results and completeness."""
    from sparse_retrieval import reference
    docs, queries = data(600, list_len + group, dim=200) if list_len < 2000 else data(2000, 17, dim=60)
    index = sr.SparseIndex.from_documents(docs, block_max=True, progress=False,
                                          term_lists=dict(list_len=list_len, group=group, summary_energy=energy))
    bm = index.block_max
    assert (fillers(bm.lists) > 0) == (list_len > 255 * group)  # steps above 255 split
    deepest = 0
    for alpha, cut, k in ((0.5, 3, 10), (1.0, 0, 7), (1.3, 5, 1), (4.0, 0, 50), (16.0, 2, 3)):
        got = bm.search(queries, k, alpha, 2, cut, lists=True)
        want = reference.list_search(bm, queries, k, alpha, cut)
        assert torch.equal(got[3], want[3]), (alpha, cut, k)
        assert torch.equal(got[2], want[2]), (alpha, cut, k)
        assert_same((got[0][want[2]], got[1][want[2]]), (want[0][want[2]], want[1][want[2]]))
        assert bool(want[2].any())
        deepest = max(deepest, int(want[3].max()))
    assert deepest > (64 if group == 1 else 8)  # past the first batch; at group 1 past BestFirst's first slice
