"""ShardedIndex on one machine: 1 process x T threads (one SparseIndex) against T processes x 1 thread (a
ShardedIndex over gloo), same documents and queries, exact search. Prints QPS of batch calls and p50/p99 latency
of single-query calls, bytes gathered per query, ratios; writes bench/results/sharded.json.

    python bench/bench_sharded.py                  # 1M documents derived from the real splade-tiny collection
    python bench/bench_sharded.py --docs 200000    # smaller

Data: ``datasets.splade_collection()`` (cached under .cache/; the first build encodes for about an hour) grown with
``derive_documents`` to --docs documents, its first --queries queries.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sparse_retrieval as sr
from common import write_results

CACHE = Path(__file__).resolve().parent.parent / ".cache"


def timings(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure(search, queries, k: int, repeats: int, latency_queries: int) -> dict:
    """QPS (median of batch calls, with spread) and single-query latency percentiles of search(q, k)."""
    search(queries, k)  # warm-up (and the one-time content check)
    batch = timings(lambda: search(queries, k), repeats)
    single = []
    for i in range(latency_queries):
        q = queries[i:i + 1]
        single += timings(lambda: search(q, k), 1)
    single.sort()
    return {"qps": len(queries) / statistics.median(batch), "spread_ms": (max(batch) - min(batch)) * 1e3,
            "latency_ms_p50": 1e3 * single[len(single) // 2],
            "latency_ms_p99": 1e3 * single[min(len(single) - 1, int(0.99 * len(single)))]}


def rank_main(rank, world, port, path, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        docs, queries = torch.load(path)
        docs, queries = sr.SparseBatch(*docs, check=False), sr.SparseBatch(*queries, check=False)
        lo, hi = len(docs) * rank // world, len(docs) * (rank + 1) // world
        local = sr.SparseIndex.from_documents(docs[lo:hi], progress=False)
        del docs
        sharded = sr.ShardedIndex.from_local(local)
        out = measure(lambda q, k: sharded.search(q, k, 1, mode="exact"), queries, args.k, args.repeats,
                      args.latency_queries)
        if rank == 0:
            results.update(out)
            results["ids"] = sharded.search(queries, args.k, 1, mode="exact")[1]
        else:
            sharded.search(queries, args.k, 1, mode="exact")
    finally:
        dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--latency-queries", type=int, default=200)
    args = ap.parse_args()
    world = args.processes
    coll = sr.datasets.splade_collection(CACHE / "splade_collection", progress=False)
    docs = sr.datasets.derive_documents(coll.docs, args.docs) if args.docs > len(coll.docs) else \
        coll.docs[:args.docs]
    queries = coll.queries[:args.queries]
    print(f"{len(docs)} documents ({docs.nnz / len(docs):.1f} nnz), {len(queries)} queries, k={args.k}; "
          f"1 process x {world} threads vs {world} processes x 1 thread (gloo); load {os.getloadavg()}", flush=True)
    rows = []
    torch.set_num_threads(world)
    one = sr.SparseIndex.from_documents(docs, progress=False)

    def search_one(q, k):
        return one.search(q, k, world, mode="exact")

    rows.append({"setup": f"1 process x {world} threads",
                 **measure(search_one, queries, args.k, args.repeats, args.latency_queries)})
    want = search_one(queries, args.k)[1]
    one = None  # freed before the processes build their shards
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        path = os.path.join(tmp, "data.pt")
        torch.save([(docs.indptr, docs.indices, docs.values, docs.dim),
                    (queries.indptr, queries.indices, queries.values, queries.dim)], path)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with mp.Manager() as manager:
            results = manager.dict()
            mp.start_processes(rank_main, args=(world, port, path, args, results), nprocs=world, join=True,
                               start_method="spawn")
            results = dict(results)
    same = bool(torch.equal(results.pop("ids"), want))
    rows.append({"setup": f"{world} processes x 1 thread", **results})
    for r in rows:
        r["vs_one_process"] = r["qps"] / rows[0]["qps"]
    gathered = world * args.k * 16  # every rank's top k as float64 (score, id) pairs, per query
    print(f"{'setup':28} {'QPS':>9} {'spread ms':>10} {'p50 ms':>8} {'p99 ms':>8} {'vs 1 process':>12}")
    for r in rows:
        print(f"{r['setup']:28} {r['qps']:9.1f} {r['spread_ms']:10.2f} {r['latency_ms_p50']:8.3f} "
              f"{r['latency_ms_p99']:8.3f} {r['vs_one_process']:12.3f}")
    print(f"identical ids: {same}; bytes gathered per query and rank: {gathered}")
    payload = {"args": vars(args), "rows": rows, "identical": same, "gathered_bytes_per_query": gathered}
    print(f"wrote {write_results('sharded', payload)}")


if __name__ == "__main__":
    main()
