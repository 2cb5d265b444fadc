"""What indexing by the terms held costs (compact_terms.py): the 202,659 real passages and their queries in their
own dim (30,522: offsets per dimension) against the same vectors with every dimension t moved to t * 2,099 + 7 in a
dim of 2^26 (offsets per term held; queries mapped to those terms on each call), same process, alternating calls.

    python bench/bench_compact_terms.py      # needs the collection cached by bench_search.py

Prints QPS (median of --repeats, with min-max), the ratio and the index bytes; writes
bench/results/compact_terms.json.
"""
from __future__ import annotations

import argparse

import torch

import sparse_retrieval as sr
from bench_search import CACHE, cluster_order_cached
from common import measure, table, threads, write_results

BIG = 1 << 26


def spread(batch: sr.SparseBatch) -> sr.SparseBatch:
    return sr.SparseBatch(batch.indptr, batch.indices.long() * 2099 + 7, batch.values, BIG, check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    coll = sr.datasets.splade_collection(CACHE.parent / "splade_collection", n_queries=4000)
    docs, queries = coll.docs, coll.queries[:args.queries]
    order, _ = cluster_order_cached("real", docs, 8)
    indexes = {"per dimension (dim 30,522)": (sr.SparseIndex.from_documents(docs, block_max=True, order=order,
                                                                            progress=False), queries),
               "per term held (dim 2^26)": (sr.SparseIndex.from_documents(spread(docs), block_max=True,
                                                                          order=order, progress=False),
                                            spread(queries))}
    rows = []
    for t in sorted({1, torch.get_num_threads()}):
        for mode in ("exact", "safe"):
            times = {name: [] for name in indexes}
            with threads(t):
                for _ in range(args.repeats):  # alternating, so that load on the machine hits both alike
                    for name, (index, q) in indexes.items():
                        times[name] += measure(lambda: index.search(q, 10, t, mode=mode), warmup=0,
                                               repeats=1)["times"]
            base = None
            for name, ts in times.items():
                ts = sorted(ts)
                qps = len(queries) / ts[len(ts) // 2]
                base = base or qps
                rows.append({"layout": name, "mode": mode, "threads": t, "qps": qps,
                             "qps_min": len(queries) / ts[-1], "qps_max": len(queries) / ts[0],
                             "vs_per_dimension": qps / base, "index_bytes": indexes[name][0].nbytes})
    print(table(rows, ["layout", "mode", "threads", "qps", "qps_min", "qps_max", "vs_per_dimension",
                       "index_bytes"]))
    same = all(torch.equal(a, b) for a, b in zip(indexes["per dimension (dim 30,522)"][0].search(queries, 10),
                                                 indexes["per term held (dim 2^26)"][0].search(spread(queries), 10)))
    print(f"identical results: {same}")
    print(f"wrote {write_results('compact_terms', {'args': vars(args), 'rows': rows, 'identical': same})}")


if __name__ == "__main__":
    main()
