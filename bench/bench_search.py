"""Sparse search on real learned-sparse vectors: SparseIndex (exact, safe and approximate block-max search) against
Seismic, BMP, sparse_dot_topn and scipy, same inputs, same process; plus exact-search runs on synthetic data.

    python bench/bench_search.py                      # real splade-tiny collection (~203k passages), all methods
    python bench/bench_search.py --scale 8841823      # the same grown to MS MARCO size (derive_documents)
    python bench/bench_search.py --synthetic          # exact search: 1M synthetic docs + BM25 man pages
    python bench/bench_search.py --gpu-scale 8841823  # GPU search only, synthetic documents drawn on the GPU

Data: ``sparse_retrieval.datasets.splade_collection`` (WordNet glosses + man-page passages encoded with splade-tiny,
4,000 held-out known-item queries; the first build encodes for about an hour and is cached under .cache/), or
``synthetic_splade`` / BM25 man pages with ``--synthetic``. Every method runs at 1 thread and at all threads; QPS is
the median over --repeats batch calls. Recall@10 is against exact search; MRR@10 against the known relevant
passages. Seismic is swept over query_cut x heap_factor, BMP (8-bit weights: round(255 w / max w)) over alpha,
SparseIndex approximate over alpha and query_cut x alpha. The slow exact peers (scipy, sparse_dot_topn) run on --peer-queries queries.
Writes bench/results/search*.json and a QPS-recall plot (search_real.png).
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import math
import os
import re
import resource
import time
from collections import Counter
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

import sparse_retrieval as sr
from sparse_retrieval.block_search import cluster_order
from sparse_retrieval.term_lists import build_term_lists
from sparse_retrieval.datasets.text import man_page
from common import add_ratios, measure, table, threads, with_env, write_results

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "bench_search"
CHUNK = 1 << 20  # documents handed to a peer's builder at a time


# ---- data ----------------------------------------------------------------------------------------------------------


def _cached(name: str, make):
    """make() -> (docs, queries) SparseBatches, stored once under CACHE/name.pt."""
    path = CACHE / f"{name}.pt"
    if path.exists():
        parts = torch.load(path)
        return tuple(sr.SparseBatch(*p, check=False) for p in parts)
    batches = make()
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save([(b.indptr, b.indices, b.values, b.dim) for b in batches], tmp)
    os.replace(tmp, path)
    return batches


def synthetic(n_docs: int, n_queries: int, seed: int = 0):
    return _cached(f"splade_{n_docs}_{n_queries}_{seed}",
                   lambda: sr.datasets.synthetic_splade(n_docs, n_queries, seed=seed))


_TOKEN = re.compile(r"[a-z][a-z0-9_]+")


def man_pages_bm25(k1: float = 0.9, b: float = 0.4, max_terms: int = 65535):
    """BM25 document vectors and binary query vectors over the English man pages installed here."""
    def make():
        pages = [p for p in (man_page(f) for f in sorted(Path("/usr/share/man").glob("man[1-9]*/*.gz"))) if p]
        doc_tf = [Counter(_TOKEN.findall(body.lower())) for _, body in pages]
        df = Counter(t for tf in doc_tf for t in tf)
        # The most frequent max_terms terms (Seismic stores dimensions in 16 bits); rarer ones are dropped.
        vocab = {t: i for i, (t, _) in enumerate(df.most_common(max_terms))}
        doc_tf = [Counter({t: c for t, c in tf.items() if t in vocab}) for tf in doc_tf]
        n = len(doc_tf)
        avg = sum(sum(tf.values()) for tf in doc_tf) / max(n, 1)
        rows = []
        for tf in doc_tf:
            length = sum(tf.values())
            items = sorted((vocab[t], math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5)) * c * (k1 + 1)
                            / (c + k1 * (1 - b + b * length / avg))) for t, c in tf.items())
            rows.append(([i for i, _ in items], [w for _, w in items]))
        qrows = []
        for desc, _ in pages:
            terms = sorted({vocab[t] for t in _TOKEN.findall(desc.lower()) if t in vocab})
            qrows.append((terms, [1.0] * len(terms)))
        dim = len(vocab)
        return sr.SparseBatch.from_lists(rows, dim), sr.SparseBatch.from_lists(qrows, dim)

    return _cached(f"manpages_bm25_{max_terms}", make)


# ---- peers ---------------------------------------------------------------------------------------------------------


def scipy_search(q: sp.csr_matrix, dt: sp.csc_matrix, k: int, batch: int = 16):
    """q @ D.T then argpartition, in query batches so the product stays small; ties to the lower id."""
    out_s, out_i = [], []
    for s in range(0, q.shape[0], batch):
        scores = (q[s:s + batch] @ dt).toarray()
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(scores, part, 1)
        order = np.lexsort((part, -top), axis=1)
        ids = np.take_along_axis(part, order, 1)
        out_s.append(np.take_along_axis(scores, ids, 1))
        out_i.append(ids)
    return np.concatenate(out_s), np.concatenate(out_i)


def topn_search(q: sp.csr_matrix, dt_csr: sp.csr_matrix, k: int, n_threads: int):
    from sparse_dot_topn import sp_matmul_topn

    m = sp_matmul_topn(q, dt_csr, top_n=k, sort=True, n_threads=n_threads)
    ids = np.full((q.shape[0], k), -1, dtype=np.int64)
    for r in range(q.shape[0]):
        cols = m.indices[m.indptr[r]:m.indptr[r + 1]]
        ids[r, :cols.size] = cols
    return ids


def seismic_build(docs: sr.SparseBatch, n_threads: int, n_postings: int = 3500):
    import seismic

    ds = seismic.SeismicDataset()
    for lo in range(0, len(docs), CHUNK):  # chunks: int64/fp32 copies of 8.8M documents would not fit beside the rest
        part = docs[lo:lo + CHUNK]
        ds.add_documents_by_id([str(i) for i in range(lo, lo + len(part))], part.indices.long().numpy(),
                               part.values.float().numpy(), part.indptr.numpy())
    return seismic.SeismicIndex.build_from_dataset(ds, n_postings=n_postings, centroid_fraction=0.1,
                                                   summary_energy=0.4, doc_cut=15, num_threads=n_threads)


def seismic_bytes(index) -> int:
    """Bytes of a Seismic index: the size of its saved file(s)."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=CACHE.parent) as tmp:
        index.save(os.path.join(tmp, "seismic"))
        return sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())


def seismic_queries(queries: sr.SparseBatch):
    import seismic

    kind = seismic.get_seismic_string()
    ptr = queries.indptr.tolist()
    tokens = [queries.indices[a:b].numpy().astype(str).astype(kind) for a, b in zip(ptr[:-1], ptr[1:])]
    values = [queries.values[a:b].float().numpy() for a, b in zip(ptr[:-1], ptr[1:])]
    return np.array([str(i) for i in range(len(queries))], dtype=kind), tokens, values


def seismic_search(index, queries, k: int, n_threads: int, query_cut: int = 10, heap_factor: float = 0.7):
    """``queries``: a SparseBatch or the output of seismic_queries (converted once outside timed loops)."""
    qids, tokens, values = seismic_queries(queries) if isinstance(queries, sr.SparseBatch) else queries
    res = index.batch_search(qids, tokens, values, k=k, query_cut=query_cut, heap_factor=heap_factor,
                             num_threads=n_threads)
    ids = np.full((len(qids), k), -1, dtype=np.int64)
    for hits in res:  # each hit is (query id, score, document id); rows may come back in any order
        for j, hit in enumerate(hits[:k]):
            ids[int(hit[0]), j] = int(hit[2])
    return ids


def bmp_build(docs: sr.SparseBatch, path: Path, bsize: int = 32):
    """A BMP index of ``docs`` with 8-bit weights round(255 w / max w) (at least 1), and its Searcher."""
    import bmp

    scale = 255.0 / max(float(docs.values.float().max()), 1e-30)
    indexer = bmp.Indexer(str(path), bsize=bsize, compress_range=False)
    for lo in range(0, len(docs), CHUNK):
        part = docs[lo:lo + CHUNK]
        ptr, idx = part.indptr.tolist(), part.indices.tolist()
        val = (part.values.float() * scale).round().clamp(min=1).int().tolist()
        for d in range(len(part)):
            a, b = ptr[d], ptr[d + 1]
            indexer.add_document(str(lo + d), {str(t): w for t, w in zip(idx[a:b], val[a:b])})
    indexer.finish()
    return bmp.Searcher(str(path))


def bmp_queries(queries: sr.SparseBatch) -> list[dict]:
    ptr, idx, val = queries.indptr.tolist(), queries.indices.tolist(), queries.values.float().tolist()
    return [{str(t): w for t, w in zip(idx[a:b], val[a:b])} for a, b in zip(ptr[:-1], ptr[1:])]


def bmp_search(searcher, qdicts: list[dict], k: int, alpha: float) -> np.ndarray:
    ids = np.full((len(qdicts), k), -1, dtype=np.int64)
    for i, q in enumerate(qdicts):
        got, _ = searcher.search(q, k=k, alpha=alpha, beta=1.0)
        ids[i, :len(got)] = [int(x) for x in got]
    return ids


# ---- measurements --------------------------------------------------------------------------------------------------


def bandwidth() -> float:
    """Single-thread read bandwidth in bytes/s: the sum of a 512 MiB tensor."""
    x = torch.ones(1 << 27)
    with threads(1):
        m = measure(lambda: x.sum(), warmup=1, repeats=5)
    return x.numel() * 4 / m["min"]


def touched_bytes(index: sr.SparseIndex, queries: sr.SparseBatch) -> np.ndarray:
    """Bytes of postings (doc id + weight) each query reads."""
    per = 4 + torch.finfo(index.dtype).bits // 8
    total = torch.zeros(len(queries), dtype=torch.int64)
    rows = queries.row_ids()
    for seg in index._segments:
        lens = seg.ptr.diff()[queries.indices.long()]
        total.index_add_(0, rows, lens)
    return (total * per).numpy()


def recall(ids: np.ndarray, exact: np.ndarray) -> float:
    hits = [len(set(a[a >= 0]) & set(b[b >= 0])) / max(1, (b >= 0).sum()) for a, b in zip(ids, exact)]
    return float(np.mean(hits))


def _facts(facts: dict, sep: str) -> str:
    """key=value pairs, floats to 4 significant digits."""
    return sep.join(f"{key}={v:.4g}" if isinstance(v, float) else f"{key}={v}" for key, v in facts.items())


def _log(rows_or_msg) -> None:
    if isinstance(rows_or_msg, dict):
        r = rows_or_msg
        print(f"  {r['method']:<18} threads={r['threads']} queries={r['queries']} "
              f"{r['median_s'] * 1e3:.3f} ms/query", flush=True)
    else:
        print(f"  {rows_or_msg}", flush=True)


def run_dataset(name, docs, queries, args, all_threads, bw, seismic=True):
    k, nq, npeer = args.k, len(queries), min(args.peer_queries, len(queries))
    print(f"\n== {name}: {len(docs)} docs, {nq} queries (peers: {npeer}), dim {docs.dim}, k={k}", flush=True)
    rows, facts = [], {"docs": len(docs), "queries": nq, "peer_queries": npeer, "dim": docs.dim,
                       "doc_nnz": docs.nnz / max(1, len(docs)), "query_nnz": queries.nnz / max(1, nq)}
    t0 = time.perf_counter()
    index = sr.SparseIndex.from_documents(docs, progress=False)
    facts["build_s"] = time.perf_counter() - t0
    facts["index_bytes"] = index.nbytes
    d_sp, q_sp = docs.to_scipy(), queries.to_scipy()
    t0 = time.perf_counter()
    dt = d_sp.T.tocsc()
    facts["scipy_build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dt_csr = d_sp.T.tocsr()
    facts["topn_build_s"] = time.perf_counter() - t0
    facts["scipy_bytes"] = dt.data.nbytes + dt.indices.nbytes + dt.indptr.nbytes
    _log(f"SparseIndex built in {facts['build_s']:.2f} s, {index.nbytes / 1e9:.3f} GB")
    peer_sp = q_sp[:npeer]

    exact_s, exact_i = index.search(queries, k)
    sci_s, sci_i = scipy_search(peer_sp, dt, k)
    ours_s, ours_i = exact_s[:npeer].numpy(), exact_i[:npeer].numpy()
    # argpartition picks any of the documents tied at the k-th score, so ids may differ where scores tie.
    facts["identical_ids_vs_scipy"] = float((ours_i == sci_i).all(1).mean())
    facts["identical_scores_vs_scipy"] = float(np.isclose(ours_s, sci_s, rtol=1e-5, atol=1e-6).all(1).mean())
    have_topn = importlib.util.find_spec("sparse_dot_topn") is not None
    if have_topn:
        topn_i = topn_search(peer_sp, dt_csr, k, 1)
        # sparse_dot_topn leaves out documents scoring 0 and orders ties arbitrarily.
        facts["identical_ids_vs_sparse_dot_topn"] = float((topn_i == ours_i).all(1).mean())
    else:
        print("sparse_dot_topn not installed: pip install sparse-dot-topn", flush=True)

    floor = touched_bytes(index, queries) / bw
    facts["touched_mb_per_query"] = float(touched_bytes(index, queries).mean() / 1e6)
    facts["floor_ms_per_query"] = float(floor.mean() * 1e3)

    for t in sorted({1, all_threads}):
        with threads(t):
            m = measure(lambda: index.search(queries, k, threads=t), warmup=1, repeats=args.repeats)
            rows.append({"method": "SparseIndex", "threads": t, "queries": nq, "median_s": m["median"] / nq})
            _log(rows[-1])
            lat = []
            for i in range(min(nq, args.latency_queries)):
                q1 = queries[i]
                t0 = time.perf_counter()
                index.search(q1, k, threads=t)
                lat.append(time.perf_counter() - t0)
            lat = np.array(lat)
            rows[-1].update(latency_ms_p50=float(np.median(lat) * 1e3),
                            latency_ms_p99=float(np.quantile(lat, .99) * 1e3))
            if t == 1:
                ratio = lat / floor[:lat.size]
                facts["latency_over_floor_median"] = float(np.median(ratio))
            if have_topn:
                m = measure(lambda: topn_search(peer_sp, dt_csr, k, t), warmup=0, repeats=args.repeats)
                rows.append({"method": "sparse_dot_topn", "threads": t, "queries": npeer,
                             "median_s": m["median"] / npeer})
                _log(rows[-1])
            m = measure(lambda: scipy_search(peer_sp, dt, k), warmup=0, repeats=args.repeats)
            rows.append({"method": "scipy", "threads": t, "queries": npeer, "median_s": m["median"] / npeer})
            _log(rows[-1])
    if seismic and not args.no_seismic:
        try:
            t0 = time.perf_counter()
            sidx = seismic_build(docs, all_threads)
            facts["seismic_build_s"] = time.perf_counter() - t0
            _log(f"seismic built in {facts['seismic_build_s']:.1f} s")
            for t in sorted({1, all_threads}):
                m = measure(lambda: seismic_search(sidx, queries, k, t), warmup=1, repeats=args.repeats)
                rows.append({"method": "seismic (approx.)", "threads": t, "queries": nq,
                             "median_s": m["median"] / nq})
                _log(rows[-1])
            facts["seismic_recall_at_k"] = recall(seismic_search(sidx, queries, k, all_threads), exact_i.numpy())
            del sidx
        except ImportError as exc:
            print(f"seismic not installed ({exc}); pip install pyseismic-lsr", flush=True)
    for r in rows:
        r["qps"] = 1.0 / r["median_s"]
        r["ms_per_query"] = r["median_s"] * 1e3
    add_ratios(rows, key=lambda r: r["threads"], baseline="scipy", out_col="vs_scipy")
    add_ratios(rows, key=lambda r: r["threads"], baseline="sparse_dot_topn", out_col="vs_sparse_dot_topn")
    if torch.cuda.is_available():
        rows += run_cuda(index, docs, queries, k, args.repeats, facts)
    print(table(rows, ["method", "threads", "queries", "qps", "ms_per_query", "latency_ms_p50", "latency_ms_p99",
                       "vs_scipy", "vs_sparse_dot_topn", "vs_cusparse"]))
    print(_facts(facts, "  "), flush=True)
    return {"rows": rows, "facts": facts}


CUSPARSE = "cusparse spmm + topk cuda"


def run_cuda(index, docs, queries, k, repeats, facts) -> list[dict]:
    """SparseIndex on the GPU against cuSPARSE: the document matrix as a torch CSR tensor times the dense query
    batch (torch.sparse.mm), then torch.topk over the documents."""
    gpu, gq = index.to("cuda"), queries.cuda()
    d_csr = torch.sparse_csr_tensor(docs.indptr.long(), docs.indices.long(), docs.values,
                                    (len(docs), docs.dim)).cuda()
    dense_q = queries.to_dense().cuda()

    def cusparse(qd):
        scores = torch.sparse.mm(d_csr, qd.T)  # (docs, batch)
        return torch.topk(scores, min(k, len(docs)), dim=0)

    ours_s = gpu.search(gq, k)[0]
    facts["cuda_identical_scores_vs_cusparse"] = float(
        torch.isclose(ours_s, cusparse(dense_q)[0].T, rtol=1e-4, atol=1e-5).all(1).float().mean())
    rows = []
    for batch in (1, 64, 1024):
        b = min(batch, len(queries))
        qb, qd = gq[:b], dense_q[:b]
        # The one-launch search is opt-in until it has passed on a GPU (SPARSE_RETRIEVAL_SEARCH_ONE_LAUNCH=1).
        one_launch = with_env(lambda: gpu.search(qb, k), "SPARSE_RETRIEVAL_SEARCH_ONE_LAUNCH", "1")
        assert torch.equal(one_launch()[1], gpu.search(qb, k)[1]), "the one-launch search disagrees"
        for method, fn in (("SparseIndex cuda", lambda: gpu.search(qb, k)), ("SparseIndex cuda one launch", one_launch),
                           (CUSPARSE, lambda: cusparse(qd))):
            m = measure(fn, warmup=2, repeats=repeats, cuda=True)
            rows.append({"method": method, "threads": 0, "queries": b, "median_s": m["median"] / b,
                         "qps": b / m["median"], "ms_per_query": m["median"] / b * 1e3})
    add_ratios(rows, key=lambda r: r["queries"], baseline=CUSPARSE, out_col="vs_cusparse")
    return rows


def run_gpu_scale(args) -> dict:
    """Exact search on the GPU against cuSPARSE at a size the CPU methods cannot afford in a device session:
    documents drawn on the GPU (seconds, where the CPU takes minutes), the index built on the CPU's threads."""
    if not torch.cuda.is_available():
        raise SystemExit("--gpu-scale needs a GPU")
    facts = {"docs": args.gpu_scale, "queries": args.queries, "device": torch.cuda.get_device_name()}
    t0 = time.perf_counter()
    docs, queries = sr.datasets.synthetic_splade(args.gpu_scale, args.queries, device="cuda")
    facts["draw_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = sr.SparseIndex.from_documents(docs, progress=False)
    facts["build_s"] = time.perf_counter() - t0
    _log(f"{args.gpu_scale} documents drawn in {facts['draw_s']:.1f} s, indexed in {facts['build_s']:.1f} s")
    rows = run_cuda(index, docs, queries, args.k, args.repeats, facts)
    print(table(rows, ["method", "queries", "qps", "ms_per_query", "vs_cusparse"]))
    print(_facts(facts, "  "), flush=True)
    return {"rows": rows, "facts": facts}


def mrr(ids: np.ndarray, relevant: list[list[int]], k: int = 10) -> float:
    return sr.metrics.mrr_at_k(torch.as_tensor(ids), [{d: 1 for d in rel} for rel in relevant], k)


def _timed(rows, method, t, nq, fn, repeats, **extra):
    m = measure(fn, warmup=1, repeats=repeats)
    times = np.array(m["times"]) / nq
    rows.append({"method": method, "threads": t, "queries": nq, "median_s": m["median"] / nq,
                 "qps": nq / m["median"], "ms_per_query": m["median"] / nq * 1e3,
                 "spread_ms": float((times.max() - times.min()) * 1e3), **extra})
    _log(rows[-1])
    return rows[-1]


def latency(index, queries, k, n, **kw) -> dict:
    """p50 / p99 of single-query calls at 1 thread."""
    lat = []
    for i in range(min(n, len(queries))):
        q1 = queries[i]
        t0 = time.perf_counter()
        index.search(q1, k, 1, **kw)
        lat.append(time.perf_counter() - t0)
    lat = np.array(lat) * 1e3
    return {"latency_ms_p50": float(np.median(lat)), "latency_ms_p99": float(np.quantile(lat, .99))}


def cluster_order_cached(name: str, docs, block_size: int):
    """(cluster_order of docs, seconds it took): computed once per collection and block size (42 minutes at 8.8M
    documents here), then read from CACHE; the time of the run that computed it is stored with it."""
    path = CACHE / f"order_{name}_{len(docs)}_{docs.nnz}_{block_size}.pt"
    if path.exists():
        saved = torch.load(path)
        return saved["order"], saved["seconds"]
    t0 = time.perf_counter()
    order = cluster_order(docs, leaf=block_size)
    seconds = time.perf_counter() - t0
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save({"order": order, "seconds": seconds}, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    return order, seconds


def run_real(docs, queries, relevant, args, all_threads, name="real"):
    """Every method on one collection: QPS at 1 and all threads, recall@k against exact, MRR@10 against the
    relevance judgements (when given), build time and bytes."""
    k, nq = args.k, len(queries)
    npeer = min(args.peer_queries, nq)
    rows, facts = [], {"docs": len(docs), "queries": nq, "dim": docs.dim, "doc_nnz": docs.nnz / max(1, len(docs)),
                       "query_nnz": queries.nnz / max(1, nq), "k": k}
    print(f"\n== {name}: {len(docs)} docs ({facts['doc_nnz']:.1f} nnz), {nq} queries ({facts['query_nnz']:.1f} nnz)",
          flush=True)
    t0 = time.perf_counter()
    index = sr.SparseIndex.from_documents(docs, progress=False)
    facts["exact_build_s"], facts["exact_bytes"] = time.perf_counter() - t0, index.nbytes
    if args.lean:  # exact results (and exact search timed below) from the exhaustive index, which is then dropped
        exact = index.search(queries, k, all_threads, mode="exact")[1].numpy()
    else:
        index = None  # built again with the block maxima from `docs`: optimize() would rebuild the documents from the
        # postings, a third copy that does not fit beside the others at MS MARCO size
        order, facts["clustering_s"] = cluster_order_cached(name, docs, args.block_size)
        t0 = time.perf_counter()
        index = sr.SparseIndex.from_documents(docs, block_max=True, block_size=args.block_size,
                                              superblock=args.superblock, order=order, progress=True)
        facts["block_max_build_s"] = time.perf_counter() - t0 - facts["exact_build_s"]
        facts["superblock"] = index.block_max.superblock
        facts["block_max_bytes"] = index.block_max.nbytes
        _log(f"exact index {facts['exact_build_s']:.1f} s {index.nbytes / 1e9:.3f} GB; block-max "
             f"{facts['block_max_build_s']:.1f} s +{facts['block_max_bytes'] / 1e9:.3f} GB")
        exact = index.search(queries, k, all_threads, mode="exact")[1].numpy()

    def quality(ids):
        out = {"recall": recall(ids, exact)}
        if relevant is not None:
            out["mrr10"] = mrr(ids, relevant)
        return out

    def ours(mode, **kw):
        return lambda t: index.search(queries, k, t, mode=mode, **kw)[1].numpy()

    configs = [("SparseIndex exact", {}, ours("exact"))]
    if not args.lean:
        configs += [("SparseIndex safe", {}, ours("safe"))]
        configs += [("SparseIndex approx", {"alpha": a}, ours("approximate", alpha=a)) for a in args.alphas]
        configs += [("SparseIndex approx cut", {"alpha": a, "query_cut": c},
                     ours("approximate", alpha=a, query_cut=c)) for c in args.query_cuts for a in args.cut_alphas]
    for t in sorted({1, all_threads}):
        for method, param, fn in configs:
            with threads(t):
                row = _timed(rows, method, t, nq, lambda: fn(t), args.repeats, **param, **quality(fn(t)))
                if t == 1 and not method.startswith("SparseIndex approx"):
                    kw = {"mode": method.split()[1]}
                    row.update(latency(index, queries, k, args.latency_queries, **kw))
        if not args.lean:
            _, _, _, visited = index.block_max.search(queries, k, 1.0, t)
            facts["safe_blocks_visited_mean"] = float(visited.float().mean())
            facts["blocks"] = index.block_max.nblocks
    settings = list(itertools.product(args.list_len, args.list_group, args.summary_energy))
    if args.lean:
        # The approximate-only index (optimize(term_lists=..., keep_postings=False, block_maxima=False), documents
        # in their order), the one that fits beside Seismic at MS MARCO size in 24 GiB, built as a user would.
        index = None  # `ours` reads `index` when called: from here on, the lean index
        list_len, group, energy = settings[0]
        t0 = time.perf_counter()
        index = sr.SparseIndex.from_documents(
            docs, block_max=True, reorder=False, keep_postings=False, block_maxima=False, progress=True,
            term_lists={"list_len": list_len, "group": group, "summary_energy": energy})
        facts["lean_build_s"], facts["lean_bytes"] = time.perf_counter() - t0, index.nbytes
        _log(f"approximate-only index {facts['lean_build_s']:.1f} s {facts['lean_bytes'] / 1e9:.3f} GB")
    # Term lists on the same block-max structure (set directly, to time their build alone: optimize() would
    # rebuild the documents from the postings), one setting at a time; mode="approximate" uses them.
    bm = index.block_max
    maxima = sum(t.numel() * t.element_size() for n, t in bm.tensors().items() if n.startswith(("sb_", "blk_")))
    facts["term_lists"] = []
    for i, (list_len, group, energy) in enumerate(settings):
        t0 = time.perf_counter()
        if not (args.lean and i == 0):  # lean: the first setting's lists came with the index
            bm.lists = None  # the previous setting's memory back first
            bm.lists = build_term_lists(bm, list_len=list_len, group=group, summary_energy=energy)
        setting = {"list_len": bm.lists.list_len, "group": group, "summary_energy": energy}
        # What each configuration of optimize() keeps (its searches are the same): everything; keep_postings=False;
        # and also block_maxima=False (its empty maxima arrays, a few MB, not counted).
        build_s = facts["lean_build_s"] if args.lean and i == 0 else time.perf_counter() - t0  # lean: whole index
        facts["term_lists"].append(dict(setting, build_s=build_s, bytes=bm.lists.nbytes,
                                        bytes_everything=facts["exact_bytes"] + bm.nbytes,
                                        bytes_without_postings=bm.nbytes, bytes_term_lists_only=bm.nbytes - maxima))
        _log("term lists " + _facts(facts["term_lists"][-1], " "))
        for t in sorted({1, all_threads}):
            for c in args.list_cuts:
                for a in args.list_alphas:
                    fn = ours("approximate", alpha=a, query_cut=c)
                    with threads(t):
                        row = _timed(rows, "SparseIndex lists", t, nq, lambda: fn(t), args.repeats, alpha=a,
                                     query_cut=c, **setting, **quality(fn(t)))
                        if t == 1:
                            row.update(latency(index, queries, k, args.latency_queries, mode="approximate",
                                               alpha=a, query_cut=c))
    print(table(rows, ["method", "threads", "list_len", "group", "summary_energy", "alpha", "query_cut", "qps",
                       "spread_ms", "recall", "mrr10", "latency_ms_p50", "latency_ms_p99"]), flush=True)
    index = None  # the peers are built next, one at a time: at MS MARCO size two indexes do not fit in 24 GiB
    if not args.no_seismic:
        try:
            for n_postings in args.seismic_postings:
                t0 = time.perf_counter()
                sidx = seismic_build(docs, all_threads, n_postings)
                facts[f"seismic_{n_postings}_build_s"] = time.perf_counter() - t0
                facts[f"seismic_{n_postings}_bytes"] = seismic_bytes(sidx)
                _log(f"seismic n_postings={n_postings} built in {facts[f'seismic_{n_postings}_build_s']:.1f} s")
                sq = seismic_queries(queries)
                for cut in args.seismic_query_cut:
                    for hf in args.seismic_heap_factor:
                        ids = seismic_search(sidx, sq, k, all_threads, cut, hf)
                        for t in sorted({1, all_threads}):
                            _timed(rows, "seismic", t, nq, lambda: seismic_search(sidx, sq, k, t, cut, hf),
                                   args.repeats, n_postings=n_postings, query_cut=cut, heap_factor=hf, **quality(ids))
                del sidx
        except ImportError as exc:
            print(f"seismic not installed ({exc}); pip install pyseismic-lsr==0.5.4", flush=True)
    if not args.no_bmp:
        try:
            path = CACHE / f"bmp_{name}_{len(docs)}"
            CACHE.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            searcher = bmp_build(docs, path)
            facts["bmp_build_s"], facts["bmp_bytes"] = time.perf_counter() - t0, path.stat().st_size
            qd = bmp_queries(queries)
            for alpha in args.bmp_alphas:  # BMP's Python API searches one query at a time: 1 thread only
                ids = bmp_search(searcher, qd, k, alpha)
                _timed(rows, "bmp", 1, nq, lambda: bmp_search(searcher, qd, k, alpha), args.repeats, alpha=alpha,
                       **quality(ids))
            del searcher
            path.unlink()
        except ImportError as exc:
            print(f"bmp not installed ({exc}); pip install bmp==0.2.8", flush=True)
    if npeer and not args.no_exact_peers:
        peer_sp, d_sp = queries[:npeer].to_scipy(), docs.to_scipy()
        dt, dt_csr = d_sp.T.tocsc(), d_sp.T.tocsr()
        for t in sorted({1, all_threads}):
            if importlib.util.find_spec("sparse_dot_topn") is not None:
                _timed(rows, "sparse_dot_topn", t, npeer, lambda: topn_search(peer_sp, dt_csr, k, t), args.repeats)
            if t == 1:
                _timed(rows, "scipy", t, npeer, lambda: scipy_search(peer_sp, dt, k), args.repeats)
    add_ratios(rows, key=lambda r: r["threads"], baseline="SparseIndex exact", out_col="vs_exact")
    print(table(rows, ["method", "threads", "alpha", "n_postings", "query_cut", "heap_factor", "qps", "spread_ms",
                       "recall", "mrr10", "latency_ms_p50", "latency_ms_p99", "vs_exact"]))
    print(_facts(facts, "  "), flush=True)
    plot(rows, RESULTS_PLOT.with_name(f"search_{name}.png"), f"{name}: {len(docs):,} docs, k={k}")
    return {"rows": rows, "facts": facts}


RESULTS_PLOT = Path(__file__).resolve().parent / "results" / "search_real.png"


def plot(rows, path: Path, title: str) -> None:
    """QPS against recall at 1 thread, one series per method (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", flush=True)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["recall"], r["qps"]) for r in rows if r["method"] == method and r["threads"] == 1
                     and "recall" in r)
        if method in ("seismic", "SparseIndex lists", "SparseIndex approx cut"):  # sweeps: their upper envelope
            env, best = [], 0.0
            for rc, q in sorted(pts, reverse=True):
                if q > best:
                    env.append((rc, q))
                    best = q
            pts = sorted(env)
        if pts:
            ax.plot(*zip(*pts), "o-" if len(pts) > 1 else "o", label=method)
    ax.set_xlabel("recall@10 against exact search")
    ax.set_ylabel("queries per second, 1 thread")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", action="store_true", help="exact search on synthetic SPLADE-like data and BM25 "
                    "man pages instead of the real collection")
    ap.add_argument("--scale", type=int, help="grow the real collection to this many documents (derive_documents)")
    ap.add_argument("--docs", type=int, default=1_000_000, help="synthetic documents (--synthetic)")
    ap.add_argument("--queries", type=int, default=4000)
    ap.add_argument("--scaled-queries", type=int, default=1000, help="queries of the --scale run (its first ones)")
    ap.add_argument("--peer-queries", type=int, default=200, help="queries for scipy and sparse_dot_topn")
    ap.add_argument("--latency-queries", type=int, default=200, help="single-query calls timed for latency")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=8)
    ap.add_argument("--superblock", type=lambda v: v if v == "auto" else int(v), default="auto",
                    help="blocks per superblock (1: every block bounded; auto: the library's choice by size)")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5])
    ap.add_argument("--query-cuts", type=int, nargs="+", default=[16, 14, 12, 8, 5])
    ap.add_argument("--cut-alphas", type=float, nargs="+", default=[1.0, 0.9, 0.8])
    ap.add_argument("--list-len", type=lambda v: v if v == "auto" else int(v), nargs="+", default=["auto"],
                    help="term lists: documents per term")
    ap.add_argument("--list-group", type=int, nargs="+", default=[8], help="term lists: documents per group")
    ap.add_argument("--summary-energy", type=float, nargs="+", default=[0.7],
                    help="term lists: share of a summary kept (every combination of the three is built)")
    ap.add_argument("--list-cuts", type=int, nargs="+", default=[6, 8, 10], help="term lists: query_cut values")
    ap.add_argument("--list-alphas", type=float, nargs="+", default=[1.0, 1.1, 1.2, 1.4])
    ap.add_argument("--bmp-alphas", type=float, nargs="+", default=[1.0, 0.9, 0.8, 0.7, 0.6])
    ap.add_argument("--seismic-postings", type=int, nargs="+", default=[3500])
    ap.add_argument("--seismic-query-cut", type=int, nargs="+", default=[3, 5, 8, 12, 20])
    ap.add_argument("--seismic-heap-factor", type=float, nargs="+", default=[0.6, 0.7, 0.8, 0.9, 1.0])
    ap.add_argument("--no-seismic", action="store_true")
    ap.add_argument("--no-bmp", action="store_true")
    ap.add_argument("--no-exact-peers", action="store_true", help="skip scipy and sparse_dot_topn")
    ap.add_argument("--seismic-synthetic", action="store_true",
                    help="also build Seismic on the synthetic set (about 10 minutes on 2 busy cores)")
    ap.add_argument("--no-manpages", action="store_true")
    ap.add_argument("--gpu-scale", type=int, help="only the GPU methods, on this many synthetic documents drawn on "
                    "the GPU (MS MARCO size: 8841823) and --queries queries")
    ap.add_argument("--lean", action="store_true", help="exhaustive index (exact results), then only the "
                    "approximate-only index (built with the first term-list setting, the others rebuilt on its "
                    "forward index; documents not reordered) and the peers: what fits in 24 GiB at MS MARCO size")
    args = ap.parse_args()
    all_threads = torch.get_num_threads()
    print(f"threads 1 and {all_threads}; SIMD {sr.get_simd_level()}; load average {os.getloadavg()}", flush=True)
    payload = {"args": vars(args), "load_average_start": os.getloadavg()}
    if args.gpu_scale:
        payload["gpu_scale"] = run_gpu_scale(args)
        print(f"wrote {write_results('search_gpu_scale', payload)}")
        return
    if not args.synthetic:
        coll = sr.datasets.splade_collection(CACHE.parent / "splade_collection", n_queries=args.queries)
        payload["collection"] = coll.info
        if args.scale:
            t0 = time.perf_counter()
            # float16 weights (6 bytes a posting in the index, 4 in the forward index): 8.8M documents in fp32
            # would not fit the 24 GiB of the dev machine beside the derived collection itself.
            docs = sr.datasets.derive_documents(coll.docs.to(torch.float16), args.scale)
            payload["derive_s"] = time.perf_counter() - t0
            queries = coll.queries[:args.scaled_queries]
            payload["scaled"] = run_real(docs, queries, None, args, all_threads, name=f"scaled_{args.scale}")
            payload["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            print(f"max RSS {payload['max_rss_gb']:.1f} GB")
            print(f"wrote {write_results('search_scaled', payload)}")
        else:
            payload["real"] = run_real(coll.docs, coll.queries, coll.relevant, args, all_threads)
            print(f"wrote {write_results('search_real', payload)}")
        return
    bw = bandwidth()
    payload["bandwidth_gbs"] = bw / 1e9
    print(f"single-thread read bandwidth {bw / 1e9:.2f} GB/s", flush=True)
    docs, queries = synthetic(args.docs, args.queries)
    payload["synthetic"] = run_dataset("synthetic_splade", docs, queries, args, all_threads, bw,
                                       seismic=args.seismic_synthetic)
    if not args.no_manpages:
        docs, queries = man_pages_bm25()
        payload["manpages"] = run_dataset("man pages BM25", docs, queries[:args.queries], args, all_threads, bw)
    print(f"wrote {write_results('search', payload)}")


if __name__ == "__main__":
    main()
