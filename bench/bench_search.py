"""Exact sparse search: SparseIndex against scipy, sparse_dot_topn, Seismic (approximate) and cuSPARSE, same inputs.

    python bench/bench_search.py                    # 1M synthetic SPLADE-like docs + BM25 man pages (~10 min)
    python bench/bench_search.py --docs 100000      # smaller synthetic set
    python bench/bench_search.py --msmarco          # 8.8M documents: build incrementally, memory, search

Data: ``sparse_retrieval.datasets.synthetic_splade`` (30,522 dims, ~120 nnz per document, ~50 per query, Zipf-like
dimension popularity) and BM25 vectors of the man pages installed on the machine (query = the page's NAME line,
removed from the document). Generated data is cached under .cache/bench_search/ (git-ignored). The slow exact
peers (scipy, sparse_dot_topn) run on the first --peer-queries queries; SparseIndex and Seismic on all of them.
Seismic (approximate) runs on the man pages by default; its build on the 1M set takes about 10 minutes on two
busy cores, so it runs there only with --seismic-synthetic. With CUDA available, the index also runs on the GPU
against cuSPARSE (``torch.sparse.mm`` of the document CSR matrix and the dense queries, then ``torch.topk``) at
1, 64 and 1,000 queries per call.
The floor is the bytes of posting lists a query touches over the single-thread memory bandwidth measured here.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
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
from common import add_ratios, measure, table, threads, write_results

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "bench_search"
MSMARCO_DOCS = 8_841_823


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


_ESCAPES = re.compile(r"\\f[BIRP1-4]|\\f\(..|\\f\[[^]]*\]|\\\(..|\\\[[^]]*\]|\\[-&e|^%]")
_TOKEN = re.compile(r"[a-z][a-z0-9_]+")


def _man_page(path: Path) -> tuple[str, str] | None:
    """(NAME description, body without the NAME section) of a man page, troff escapes and requests removed."""
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8", "replace")
    except (OSError, EOFError):
        return None
    lines, body, name, in_name = text.splitlines(), [], [], False
    for line in lines:
        if line.startswith(".SH") or line.startswith(".Sh"):
            in_name = line.split(None, 1)[-1].strip().strip('"').upper() == "NAME"
            continue
        if line.startswith(".\\\"") or line.startswith("'\\\""):
            continue
        clean = _ESCAPES.sub(" ", line.lstrip(".") if line.startswith(".") else line)
        (name if in_name else body).append(clean)
    desc = " ".join(name).split(" - ", 1)[-1] if " - " in " ".join(name) else " ".join(name)
    return (desc, " ".join(body)) if desc.strip() else None


def man_pages_bm25(k1: float = 0.9, b: float = 0.4, max_terms: int = 65535):
    """BM25 document vectors and binary query vectors over the English man pages installed here."""
    def make():
        pages = [p for p in (_man_page(f) for f in sorted(Path("/usr/share/man").glob("man[1-9]*/*.gz"))) if p]
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


def seismic_build(docs: sr.SparseBatch, n_threads: int):
    import seismic

    ds = seismic.SeismicDataset()
    ds.add_documents_by_id([str(i) for i in range(len(docs))], docs.indices.long().numpy(),
                           docs.values.float().numpy(), docs.indptr.numpy())
    return seismic.SeismicIndex.build_from_dataset(ds, n_postings=3500, centroid_fraction=0.1, summary_energy=0.4,
                                                   doc_cut=15, num_threads=n_threads)


def seismic_search(index, queries: sr.SparseBatch, k: int, n_threads: int):
    import seismic

    kind = seismic.get_seismic_string()
    ptr = queries.indptr.tolist()
    tokens = [queries.indices[a:b].numpy().astype(str).astype(kind) for a, b in zip(ptr[:-1], ptr[1:])]
    values = [queries.values[a:b].float().numpy() for a, b in zip(ptr[:-1], ptr[1:])]
    qids = np.array([str(i) for i in range(len(queries))], dtype=kind)
    res = index.batch_search(qids, tokens, values, k=k, query_cut=10, heap_factor=0.7, num_threads=n_threads)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    for hits in res:  # each hit is (query id, score, document id); rows may come back in any order
        for j, hit in enumerate(hits[:k]):
            ids[int(hit[0]), j] = int(hit[2])
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
    peer_q, peer_sp = queries[:npeer], q_sp[:npeer]

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
    print("  ".join(f"{key}={v:.4g}" if isinstance(v, float) else f"{key}={v}" for key, v in facts.items()),
          flush=True)
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
        for method, fn in (("SparseIndex cuda", lambda: gpu.search(qb, k)), (CUSPARSE, lambda: cusparse(qd))):
            m = measure(fn, warmup=2, repeats=repeats, cuda=True)
            rows.append({"method": method, "threads": 0, "queries": b, "median_s": m["median"] / b,
                         "qps": b / m["median"], "ms_per_query": m["median"] / b * 1e3})
    add_ratios(rows, key=lambda r: r["queries"], baseline=CUSPARSE, out_col="vs_cusparse")
    return rows


def run_msmarco(args, all_threads, bw):
    """8.8M documents: the cached 1M synthetic documents repeated with fresh weights per chunk (generating 8.8M
    fresh ones with datasets.synthetic_splade takes about an hour on 2 cores), added chunk by chunk."""
    from tqdm.auto import tqdm

    base, queries = synthetic(1_000_000, args.queries)
    gen = torch.Generator().manual_seed(1)
    index = sr.SparseIndex(base.dim, segment_size=1 << 20)
    t0 = time.perf_counter()
    with tqdm(total=MSMARCO_DOCS, desc="indexing", unit="doc") as bar:
        while len(index) < MSMARCO_DOCS:
            n = min(len(base), MSMARCO_DOCS - len(index))
            chunk = base[:n]
            weights = torch.log1p(torch.exp(torch.randn(chunk.nnz, generator=gen) * 0.8 + 0.3))
            index.add(sr.SparseBatch(chunk.indptr, chunk.indices, weights, base.dim, check=False), progress=False)
            bar.update(n)
    facts = {"docs": len(index), "build_s": time.perf_counter() - t0, "index_bytes": index.nbytes,
             "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    floor = touched_bytes(index, queries) / bw
    facts["touched_mb_per_query"] = float(touched_bytes(index, queries).mean() / 1e6)
    rows = []
    nq = min(len(queries), args.peer_queries)
    for t in sorted({1, all_threads}):
        lat = []
        for i in range(nq):
            t0 = time.perf_counter()
            index.search(queries[i], args.k, threads=t)
            lat.append(time.perf_counter() - t0)
        m = measure(lambda: index.search(queries[:nq], args.k, threads=t), warmup=0, repeats=1)
        rows.append({"method": "SparseIndex", "threads": t, "queries": nq, "qps": nq / m["median"],
                     "latency_ms_p50": float(np.median(lat) * 1e3),
                     "floor_ms": float(floor[:nq].mean() * 1e3)})
    print(table(rows, ["method", "threads", "queries", "qps", "latency_ms_p50", "floor_ms"]))
    print(facts, flush=True)
    return {"rows": rows, "facts": facts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--peer-queries", type=int, default=100, help="queries for scipy and sparse_dot_topn")
    ap.add_argument("--latency-queries", type=int, default=100, help="single-query calls timed for latency")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-seismic", action="store_true")
    ap.add_argument("--seismic-synthetic", action="store_true",
                    help="also build Seismic on the synthetic set (about 10 minutes on 2 busy cores)")
    ap.add_argument("--no-manpages", action="store_true")
    ap.add_argument("--msmarco", action="store_true", help="only the 8.8M-document run")
    args = ap.parse_args()
    all_threads = torch.get_num_threads()
    bw = bandwidth()
    print(f"single-thread read bandwidth {bw / 1e9:.2f} GB/s; threads 1 and {all_threads}; "
          f"SIMD {sr.get_simd_level()}", flush=True)
    payload = {"args": vars(args), "bandwidth_gbs": bw / 1e9, "load_average_start": os.getloadavg()}
    print(f"load average {os.getloadavg()} (other users of this machine slow every method alike)", flush=True)
    if args.msmarco:
        payload["msmarco"] = run_msmarco(args, all_threads, bw)
        print(f"wrote {write_results('search_msmarco', payload)}")
        return
    docs, queries = synthetic(args.docs, args.queries)
    payload["synthetic"] = run_dataset("synthetic_splade", docs, queries, args, all_threads, bw,
                                       seismic=args.seismic_synthetic)
    if not args.no_manpages:
        docs, queries = man_pages_bm25()
        payload["manpages"] = run_dataset("man pages BM25", docs, queries[:args.queries], args, all_threads, bw)
    print(f"wrote {write_results('search', payload)}")


if __name__ == "__main__":
    main()
