"""What search filters and deletes cost: exact and safe search over the 202,659 real passages with a random allowed
set of several selectivities (a bool mask, applied inside the kernels, or the allowed documents scored alone when
they are few) and with deleted documents, against the same search without them, 1 thread, same process.

    python bench/bench_filters.py            # needs the collection cached by bench_search.py

Prints QPS (median of --repeats, with min-max) and the ratio to the unfiltered search; writes
bench/results/filters.json.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import sparse_retrieval as sr
from bench_search import CACHE, cluster_order_cached
from common import write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=4000)
    ap.add_argument("--selectivity", type=float, nargs="+", default=[0.5, 0.1, 0.01, 0.001])
    ap.add_argument("--deleted", type=float, default=0.1, help="share of documents deleted in the delete rows")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    coll = sr.datasets.splade_collection(CACHE.parent / "splade_collection", n_queries=4000)
    docs, queries = coll.docs, coll.queries[:args.queries]
    order, _ = cluster_order_cached("real", docs, 8)
    index = sr.SparseIndex.from_documents(docs, block_max=True, order=order, progress=False)
    n, gen = len(docs), torch.Generator().manual_seed(0)

    def qps(mode, **kw):
        # "..., no scan": the library scores the allowed documents alone when they are few enough
        # (sr.index._SCAN_SHARE); these rows keep the search kernels instead, which is how that share was set.
        share = sr.index._SCAN_SHARE
        sr.index._SCAN_SHARE = 0.0 if mode.endswith("no scan") else share
        times = []
        try:
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                index.search(queries, 10, 1, mode=mode.split(",")[0], **kw)
                times.append(time.perf_counter() - t0)
        finally:
            sr.index._SCAN_SHARE = share
        return len(queries) / statistics.median(times), len(queries) / max(times), len(queries) / min(times)

    rows = []
    for mode in ("exact", "safe", "exact, no scan", "safe, no scan"):
        base = qps(mode)
        rows.append({"mode": mode, "case": "none", "qps": base[0], "spread": base[1:], "vs_none": 1.0})
        for share in args.selectivity:
            mask = torch.rand(n, generator=gen) < share
            got = qps(mode, filter=mask)
            rows.append({"mode": mode, "case": f"filter {share:g}", "qps": got[0], "spread": got[1:],
                         "vs_none": got[0] / base[0]})
    deleted = torch.randperm(n, generator=gen)[:int(args.deleted * n)]
    index.delete(deleted)
    for mode in ("exact", "safe"):
        base = next(r["qps"] for r in rows if r["mode"] == mode and r["case"] == "none")
        got = qps(mode)
        rows.append({"mode": mode, "case": f"{args.deleted:g} deleted", "qps": got[0], "spread": got[1:],
                     "vs_none": got[0] / base})
    for r in rows:
        print(f"{r['mode']:12s} {r['case']:14s} {r['qps']:8.0f} QPS ({r['spread'][0]:.0f}-{r['spread'][1]:.0f}) "
              f"{r['vs_none']:.2f}x unfiltered", flush=True)
    print(f"wrote {write_results('filters', {'args': vars(args), 'docs': n, 'rows': rows})}")


if __name__ == "__main__":
    main()
