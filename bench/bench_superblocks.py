"""Safe and approximate block-max search for several superblock sizes over one forward index and one clustering
order (cached by bench_search.py), 1 thread, against exhaustive search in the same process.

    python bench/bench_superblocks.py                          # the 202,659 real passages, S = 1 2 4 16
    python bench/bench_superblocks.py --scale 8841823 --superblocks 1 4 16   # needs bench_search.py --scale's cache

Prints QPS (median of --repeats, with min-max), blocks scored per query and the bytes of the maxima, and writes
bench/results/superblocks.json.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

import sparse_retrieval as sr
from sparse_retrieval.block_search import with_maxima
from bench_search import CACHE, cluster_order_cached
from common import write_results


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, help="grow the real collection to this many documents (derive_documents)")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--superblocks", type=int, nargs="+", default=[1, 2, 4, 16])
    ap.add_argument("--block-size", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    coll = sr.datasets.splade_collection(CACHE.parent / "splade_collection", n_queries=4000)
    docs, name = coll.docs, "real"
    if args.scale:
        docs, name = sr.datasets.derive_documents(coll.docs.to(torch.float16), args.scale), f"scaled_{args.scale}"
    queries = coll.queries[:args.queries]
    order, _ = cluster_order_cached(name, docs, args.block_size)
    index = sr.SparseIndex.from_documents(docs, progress=False)
    t_exact = timed(lambda: index.search(queries, 10, 1, mode="exact"), args.repeats)
    want = t_exact[3][1]
    index = None  # freed before the forward index is built: both do not fit at MS MARCO size
    gc.collect()
    step = 1 << 20
    fwd = sr.SparseBatch.cat([docs[order[a:a + step]] for a in range(0, len(docs), step)])
    dim = docs.dim
    del docs
    gc.collect()
    terms = fwd.indices.to(torch.int16 if dim <= 65536 else torch.int32)
    ptr, values = fwd.indptr, fwd.values
    del fwd
    gc.collect()
    forward_bytes = ptr.numel() * 8 + terms.numel() * terms.element_size() + values.numel() * values.element_size()
    rows = [{"superblock": "exhaustive", "qps": len(queries) / t_exact[0],
             "spread_qps": [len(queries) / t_exact[2], len(queries) / t_exact[1]]}]
    print(f"{name}: {len(order)} documents, {len(queries)} queries; exhaustive {rows[0]['qps']:.0f} QPS", flush=True)
    for s in args.superblocks:
        t0 = time.perf_counter()
        bm = with_maxima(dim, args.block_size, s, ptr, terms, values, order.long())
        build = time.perf_counter() - t0
        safe = timed(lambda: bm.search(queries, 10, 1.0, 1), args.repeats)
        approx = timed(lambda: bm.search(queries, 10, args.alpha, 1), args.repeats)
        _, ids, complete, visited = safe[3]
        same = bool(torch.equal(ids[complete], want[complete]))
        row = {"superblock": s, "qps": len(queries) / safe[0], "spread_qps": [len(queries) / safe[2],
                                                                              len(queries) / safe[1]],
               f"qps_alpha_{args.alpha}": len(queries) / approx[0], "blocks_scored": float(visited.float().mean()),
               "maxima_bytes": bm.nbytes - forward_bytes - order.numel() * 8, "build_s": build,
               "same_as_exhaustive": same}
        rows.append(row)
        print(f"S={s:3d}: safe {row['qps']:.0f} QPS ({row['spread_qps'][0]:.0f}-{row['spread_qps'][1]:.0f}), "
              f"{row['qps'] / rows[0]['qps']:.2f}x exhaustive; alpha {args.alpha}: "
              f"{row[f'qps_alpha_{args.alpha}']:.0f} QPS; {row['blocks_scored']:.1f} blocks scored; maxima "
              f"{row['maxima_bytes'] / 1e9:.3f} GB built in {build:.1f} s; same ids as exhaustive: {same}",
              flush=True)
        bm = None
        gc.collect()
    print(f"wrote {write_results('superblocks', {'args': vars(args), 'collection': name, 'rows': rows})}")


if __name__ == "__main__":
    main()
