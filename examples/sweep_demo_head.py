"""Hyper-parameter sweep of the demo's CSR head (``examples/demo.py``) on its validation split, several seeds per
setting: trains one head per (setting, seed) with the demo's own ``train_csr`` and reports % of dense MiniLM's
MRR@10 at k = 16 / 32 / 64 (codes scored by brute force), then the mean over seeds.

    python examples/sweep_demo_head.py dump sweep.pt            # where the model is installed: embeddings + split
    python examples/sweep_demo_head.py run sweep.pt grid.json out.json   # anywhere; on the GPU when there is one

``grid.json``: a list of settings, each a dict of demo options by attribute name (``{"epochs": 50}``) with a
``"seeds"`` list (default ``[0]``). The dump holds the embeddings as float16 and the validation split, so the
machine that runs the sweep needs neither the model nor the corpus (a lent GPU machine has neither). A 25-epoch
head trains in about 1-2 s on an H100 against 2 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from sparse_retrieval import metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo  # noqa: E402


def dump(path: Path) -> None:
    args = demo.parser().parse_args(["--out", str(path.parent), "--validate"])
    bodies, query_docs, d_emb, q_emb, p_emb, p_doc = demo.load_corpus(args)
    test, train = demo.split_queries(len(query_docs), args)
    payload = {"d": d_emb.half(), "q": q_emb.half(), "p": p_emb.half(), "p_doc": p_doc, "query_docs": query_docs,
               "test": test, "train": train}
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def mrr_at_10(scores: torch.Tensor, relevant: torch.Tensor) -> float:
    return metrics.mrr_at_k(scores.topk(10, dim=1).indices.cpu(), relevant.cpu(), 10)


def run(data: Path, grid: list[dict], out: Path) -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    D = torch.load(data)
    d, q, p = (D[n].float().to(dev) for n in ("d", "q", "p"))
    pairs = torch.stack([D["train"], D["query_docs"][D["train"]]], 1).to(dev)
    relevant, q_test = D["query_docs"][D["test"]].to(dev), q[D["test"].to(dev)]
    dense = mrr_at_10(q_test @ d.T, relevant)
    defaults = vars(demo.parser().parse_args(["--out", str(out.parent)]))
    rows = []
    for setting in grid:
        setting = dict(setting)
        seeds = setting.pop("seeds", [0])
        args = argparse.Namespace(**{**defaults, **setting})
        runs = []
        for seed in seeds:
            t0 = time.perf_counter()
            head = demo.train_csr(q, d, pairs, p, D["p_doc"].to(dev), args, args.train_k, seed)
            with torch.no_grad():
                runs.append({"seed": seed, "seconds": time.perf_counter() - t0,
                             **{f"k{k}": 100 * mrr_at_10(head.codes(q_test, k) @ head.codes(d, k).T, relevant) / dense
                                for k in (16, 32, 64)}})
        row = {"setting": setting, "runs": runs,
               **{f"mean_k{k}": sum(r[f"k{k}"] for r in runs) / len(runs) for k in (16, 32, 64)}}
        rows.append(row)
        print(json.dumps({"setting": setting, **{key: round(v, 1) for key, v in row.items() if key.startswith("mean")},
                          "k32_by_seed": [round(r["k32"], 1) for r in runs]}), flush=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"device": dev, "dense_mrr@10": dense, "rows": rows}, indent=1))
        os.replace(tmp, out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("dump").add_argument("data", type=Path)
    r = sub.add_parser("run")
    r.add_argument("data", type=Path)
    r.add_argument("grid", type=Path)
    r.add_argument("out", type=Path)
    a = ap.parse_args()
    if a.cmd == "dump":
        dump(a.data)
    else:
        run(a.data, json.loads(a.grid.read_text()), a.out)
