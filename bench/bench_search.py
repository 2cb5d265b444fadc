"""Exact sparse search: the reference (pure torch) against scipy (`q @ D.T` + argpartition) on the same inputs.

    python bench/bench_search.py [--docs 20000] [--queries 100] [--k 10]

Data: sparse_retrieval.datasets.synthetic_splade (MS MARCO SPLADE-like statistics, 30,522 dimensions).
"""
from __future__ import annotations

import argparse

import numpy as np
import scipy.sparse as sp
import torch

import sparse_retrieval as sr
from common import add_ratios, measure, table, threads, write_results


def scipy_search(q: sp.csr_matrix, dt: sp.csc_matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = (q @ dt).toarray()
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(scores, part, 1)
    order = np.lexsort((part, -top), axis=1)  # descending score, then lower id
    ids = np.take_along_axis(part, order, 1)
    return np.take_along_axis(scores, ids, 1), ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    docs, queries = sr.datasets.synthetic_splade(args.docs, args.queries, seed=0)
    q_sp, d_sp = queries.to_scipy(), docs.to_scipy()
    dt = d_sp.T.tocsc()
    rows = []
    for n_threads in sorted({1, torch.get_num_threads()}):
        with threads(n_threads):
            ref = measure(lambda: sr.reference.sparse_search(queries, docs, args.k), repeats=args.repeats)
            sci = measure(lambda: scipy_search(q_sp, dt, args.k), repeats=args.repeats)
        for name, m in (("reference", ref), ("scipy", sci)):
            rows.append({"method": name, "threads": n_threads, "median_s": m["median"], "min_s": m["min"],
                         "qps": args.queries / m["median"]})
    add_ratios(rows, key=lambda r: r["threads"], baseline="scipy")

    ref_scores, ref_ids = sr.reference.sparse_search(queries, docs, args.k)
    sci_scores, sci_ids = scipy_search(q_sp, dt, args.k)
    same = float((ref_ids.numpy() == sci_ids).mean())
    print(f"synthetic_splade: {args.docs} docs, {args.queries} queries, k={args.k}; "
          f"identical top-{args.k} ids: {same:.4f}")
    print(table(rows, ["method", "threads", "median_s", "min_s", "qps", "speedup"]))
    path = write_results("search_reference", {"args": vars(args), "rows": rows, "identical_ids": same})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
