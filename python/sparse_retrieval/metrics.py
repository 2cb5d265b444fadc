"""Sparsity statistics (FLOPs of Paria et al. 2020) and ranking metrics (recall, MRR, nDCG at a cutoff).

Ranking metrics take a *run* and *relevance judgments* (qrels), in either form:

* TREC / pytrec_eval form: ``run = {qid: {docid: score}}``, ``qrels = {qid: {docid: relevance}}``. Documents are
  ranked by score, descending; equal scores by doc id in *descending* string order, as trec_eval does.
* Tensor form: ``run`` is an int tensor (n_queries, depth) of ranked doc ids, as ``SparseIndex.search`` returns
  (ids < 0 are padding and skipped); ``qrels`` is an int tensor (n_queries,) of the one relevant doc id of each
  query (known-item search) or a sequence of ``{docid: relevance}`` dicts, one per query.

A document is relevant when its relevance is >= 1. Scores are averaged over the queries of ``qrels`` that have at
least one relevant document; such a query missing from the run scores 0 (trec_eval's ``-c``). These definitions
match trec_eval's ``recall_k``, ``recip_rank`` on the run cut at k, and ``ndcg_cut_k`` (linear gains).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence, Union

import torch

from .sparse import SparseBatch

Embeddings = Union[torch.Tensor, SparseBatch]

__all__ = [
    "active_share", "expected_flops", "flops_suboptimality", "nnz_stats", "recall_at_k", "mrr_at_k", "ndcg_at_k",
]


# ---- sparsity ----------------------------------------------------------------------------------------------------
def _row_nnz_and_dims(x: Embeddings, name: str) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(non-zeros per row, column of every non-zero, rows, dim)."""
    if isinstance(x, SparseBatch):
        nz = x.values != 0  # stored zeros do not cost a multiply-add
        rows = x.row_ids()[nz]
        return torch.bincount(rows, minlength=len(x)), x.indices[nz].long(), len(x), x.dim
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise TypeError(f"{name}: expected a (rows, dim) tensor or a SparseBatch, got "
                        f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    nz = x != 0
    return nz.sum(1), nz.nonzero()[:, 1], x.shape[0], x.shape[1]


def active_share(x: Embeddings) -> torch.Tensor:
    """p_j: float64 (dim,), the share of rows whose dimension j is non-zero."""
    _, cols, n, dim = _row_nnz_and_dims(x, "x")
    if n == 0:
        raise ValueError("x: needs at least one row")
    return torch.bincount(cols, minlength=dim).double() / n


def expected_flops(q: Embeddings, d: Embeddings) -> float:
    """``sum_j p_j(q) p_j(d)``: the expected multiply-adds to score one query against one document with an inverted
    index (times the number of documents for a full search)."""
    pq, pd = active_share(q), active_share(d)
    if pq.numel() != pd.numel():
        raise ValueError(f"q and d have different dims: {pq.numel()} vs {pd.numel()}")
    return float((pq * pd.to(pq.device)).sum())


def flops_suboptimality(x: Embeddings) -> float:
    """``dim * sum_j p_j^2 / (mean non-zeros per row)^2``: 1 when non-zeros spread evenly over dimensions, larger
    when they crowd into a few (Paria et al. 2020). NaN for a batch with no non-zeros."""
    nnz, cols, n, dim = _row_nnz_and_dims(x, "x")
    if n == 0:
        raise ValueError("x: needs at least one row")
    p = torch.bincount(cols, minlength=dim).double() / n
    mean_nnz = float(nnz.double().mean())
    return dim * float(p.square().sum()) / mean_nnz ** 2 if mean_nnz > 0 else math.nan


def nnz_stats(x: Embeddings) -> dict[str, float]:
    """Non-zeros per row (mean, std, min, median, max; the median of an even count is the mean of the middle two,
    as numpy's), the number of dimensions used by any row, and the share of all ``rows * dim`` entries that are
    non-zero."""
    nnz, cols, n, dim = _row_nnz_and_dims(x, "x")
    if n == 0:
        raise ValueError("x: needs at least one row")
    f = nnz.double()
    return {"rows": n, "dim": dim, "mean": float(f.mean()), "std": float(f.std(unbiased=False)),
            "min": int(nnz.min()), "median": float(f.quantile(0.5)), "max": int(nnz.max()),
            "dims_used": int(torch.unique(cols).numel()), "density": float(f.sum()) / (n * dim) if dim else 0.0}


# ---- ranking metrics ---------------------------------------------------------------------------------------------
def _normalize(run, qrels) -> tuple[dict, dict]:
    """Both as {qid: ...}: run -> ranked list of doc ids; qrels -> {docid: relevance}."""
    if isinstance(run, torch.Tensor):
        if run.dim() != 2 or run.is_floating_point():
            raise ValueError(f"run: expected an int tensor (n_queries, depth) of doc ids, got {run.dtype} "
                             f"{tuple(run.shape)}")
        ranked = {i: [d for d in row if d >= 0] for i, row in enumerate(run.tolist())}
        if isinstance(qrels, torch.Tensor):
            if qrels.shape != (run.shape[0],) or qrels.is_floating_point():
                raise ValueError(f"qrels: expected an int tensor of shape ({run.shape[0]},), one relevant id per "
                                 f"query, got {qrels.dtype} {tuple(qrels.shape)}")
            judged = {i: {d: 1} for i, d in enumerate(qrels.tolist())}
        elif isinstance(qrels, Sequence) and not isinstance(qrels, (str, bytes)):
            if len(qrels) != run.shape[0]:
                raise ValueError(f"qrels: has {len(qrels)} entries, run has {run.shape[0]} queries")
            judged = {i: dict(r) for i, r in enumerate(qrels)}
        else:
            raise TypeError(f"qrels: with a tensor run, expected an int tensor or a sequence of dicts, got "
                            f"{type(qrels).__name__}")
        return ranked, judged
    if not isinstance(run, Mapping) or not isinstance(qrels, Mapping):
        raise TypeError("run and qrels: expected both as {qid: {docid: value}} dicts, or a tensor run")
    # trec_eval order: score descending, then doc id descending.
    ranked = {q: [d for d, _ in sorted(docs.items(), key=lambda it: (it[1], it[0]), reverse=True)]
              for q, docs in run.items()}
    return ranked, {q: dict(r) for q, r in qrels.items()}


def _check_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k!r}")


def _evaluate(run, qrels, k: int, per_query_metric, per_query: bool):
    _check_k(k)
    ranked, judged = _normalize(run, qrels)
    scores = {}
    for q, rels in judged.items():
        relevant = {d for d, r in rels.items() if r >= 1}
        if relevant:
            scores[q] = per_query_metric(ranked.get(q, [])[:k], rels, relevant, k)
    if per_query:
        return scores
    return sum(scores.values()) / len(scores) if scores else 0.0


def _recall(top, rels, relevant, k):
    return sum(d in relevant for d in top) / len(relevant)


def _rr(top, rels, relevant, k):
    return next((1.0 / (i + 1) for i, d in enumerate(top) if d in relevant), 0.0)


def _ndcg(top, rels, relevant, k):
    dcg = sum(max(rels.get(d, 0), 0) / math.log2(i + 2) for i, d in enumerate(top))
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
    return dcg / sum(r / math.log2(i + 2) for i, r in enumerate(ideal))


def recall_at_k(run, qrels, k: int = 10, per_query: bool = False):
    """Share of each query's relevant documents found in its top k, averaged over queries (see the module doc)."""
    return _evaluate(run, qrels, k, _recall, per_query)


def mrr_at_k(run, qrels, k: int = 10, per_query: bool = False):
    """Mean reciprocal rank of the first relevant document within the top k (0 if none)."""
    return _evaluate(run, qrels, k, _rr, per_query)


def ndcg_at_k(run, qrels, k: int = 10, per_query: bool = False):
    """nDCG@k with linear gains (relevance) and ``log2(rank + 1)`` discounts, as trec_eval's ``ndcg_cut``."""
    return _evaluate(run, qrels, k, _ndcg, per_query)
