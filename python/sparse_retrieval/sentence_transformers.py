"""sentence-transformers interoperation: the library's losses inside its trainer, and an evaluator that searches a
`SparseIndex`.

A ``SparseEncoder``'s ``encode(..., convert_to_sparse_tensor=True)`` output is a torch sparse tensor, which
``SparseBatch.from_torch``, ``SparseIndex.from_documents`` and ``SparseIndex.search`` take as is::

    index = sr.SparseIndex.from_documents(model.encode_document(corpus, convert_to_sparse_tensor=True))
    scores, ids = index.search(model.encode_query(queries, convert_to_sparse_tensor=True), k=10)

The adapter calls ``model(features)["sentence_embedding"]`` (its module convention) and the evaluator
``encode_query`` / ``encode_document`` (or ``encode``). Where sentence-transformers is installed, the evaluator is
one of its evaluators (its trainer takes it as ``evaluator=``); nothing else needs it.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from . import metrics
from .index import SparseIndex
from .sparse import SparseBatch, as_sparse_batch

__all__ = ["SentenceTransformersLoss", "SparseIndexEvaluator"]

# The trainer wraps an evaluator that is not one of its own in a SequentialEvaluator, which then expects a list.
try:
    from sentence_transformers.base.evaluation.evaluator import BaseEvaluator as _Evaluator  # v6
except ImportError:
    try:
        from sentence_transformers.evaluation import SentenceEvaluator as _Evaluator  # v5
    except ImportError:
        _Evaluator = object


class SentenceTransformersLoss(torch.nn.Module):
    """One of this library's losses (``loss(q, pos, negatives, **kw)``: a ranking function such as
    `losses.info_nce`, or `losses.SparseRetrievalLoss`) as a sentence-transformers loss module.

    The trainer calls it with the tokenized columns of a batch (anchor, positive, then any negatives) and the
    labels; each column is embedded with ``model`` and handed over as ``loss(anchor, positive, negatives)``.
    ``labels_as`` names the keyword the labels go to (``"teacher_margin"`` for `losses.margin_mse`,
    ``"teacher_scores"`` for `losses.kl_distill`); without it labels are ignored. ``compute_loss_from_embeddings``
    makes it usable as the base loss of sentence-transformers' ``SpladeLoss`` too.
    """

    def __init__(self, model: torch.nn.Module, loss: Callable[..., torch.Tensor], labels_as: str | None = None):
        super().__init__()
        if not callable(loss):
            raise TypeError(f"loss: expected a callable, got {type(loss).__name__}")
        self.model = model
        self.loss = loss
        self.labels_as = labels_as

    def compute_loss_from_embeddings(self, embeddings: Sequence[torch.Tensor],
                                     labels: torch.Tensor | None = None) -> torch.Tensor:
        if len(embeddings) < 2:
            raise ValueError(f"embeddings: expected at least (anchor, positive) columns, got {len(embeddings)}")
        kw = {}
        if self.labels_as is not None:
            if labels is None:
                raise ValueError(f"labels: the loss takes them as {self.labels_as!r} but the batch has none")
            kw[self.labels_as] = labels
        negatives = list(embeddings[2:]) or None
        return self.loss(embeddings[0], embeddings[1], negatives, **kw)

    def forward(self, sentence_features: Sequence[Mapping[str, torch.Tensor]],
                labels: torch.Tensor | None = None) -> torch.Tensor:
        embeddings = [self.model(features)["sentence_embedding"] for features in sentence_features]
        return self.compute_loss_from_embeddings(embeddings, labels)


class SparseIndexEvaluator(_Evaluator):
    """Retrieval quality and cost of a sparse encoder, measured by searching a `SparseIndex` of ``corpus``.

    ``queries`` and ``corpus`` map ids to texts, ``relevant`` maps a query id to the ids of its relevant documents
    (a collection, or a mapping to graded relevance for nDCG). Calling it with a model (a sentence-transformers
    ``SparseEncoder``, or anything with ``encode_query``/``encode_document`` or ``encode`` returning sparse or dense
    (n, dim) embeddings) returns ``mrr@k``, ``recall@k``, ``ndcg@k``, ``flops`` (expected multiply-adds per
    query-document pair, Paria et al.), ``query_nnz`` and ``doc_nnz``, prefixed with ``name``. The signature
    (``model, output_path, epoch, steps``) is the one sentence-transformers' trainer calls evaluators with.
    """

    def __init__(self, queries: Mapping, corpus: Mapping, relevant: Mapping, k: int = 10, name: str = "",
                 batch_size: int = 32, mode: str = "exact"):
        super().__init__()
        if not queries or not corpus:
            raise ValueError("queries and corpus must not be empty")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected an int >= 1, got {k!r}")
        missing = set(relevant) - set(queries)
        if missing:
            raise ValueError(f"relevant: query ids {sorted(map(str, missing))[:5]} are not in queries")
        self.query_ids, self.query_texts = list(queries), list(queries.values())
        self.doc_ids, self.doc_texts = list(corpus), list(corpus.values())
        self.relevant = {q: dict(r) if isinstance(r, Mapping) else {d: 1 for d in r}
                         for q, r in relevant.items()}
        self.k, self.batch_size, self.mode = k, batch_size, mode
        self.name = name
        self.primary_metric = f"{name + '_' if name else ''}mrr@{k}"
        self.greater_is_better = True

    def _encode(self, model, texts: list, kind: str):
        encode = getattr(model, f"encode_{kind}", None) or model.encode
        # A SparseEncoder, a dense SentenceTransformer (it refuses convert_to_sparse_tensor), anything else.
        for kw in ({"convert_to_sparse_tensor": True}, {"convert_to_tensor": True}, None):
            try:
                out = encode(texts) if kw is None else \
                    encode(texts, batch_size=self.batch_size, show_progress_bar=False, **kw)
                break
            except (TypeError, ValueError) as exc:
                if kw is None or "keyword argument" not in str(exc):
                    raise
        b = as_sparse_batch(out, kind).to("cpu")
        return SparseBatch(b.indptr, b.indices, b.values.detach(), b.dim, check=False)

    def __call__(self, model, output_path: str | None = None, epoch: int = -1, steps: int = -1) -> dict:
        q = self._encode(model, self.query_texts, "query")
        d = self._encode(model, self.doc_texts, "document")
        index = SparseIndex.from_documents(d, ids=self.doc_ids, progress=False)
        scores, ids = index.search(q, self.k, mode=self.mode)
        run = {qid: {doc: s for doc, s in zip(row, srow) if doc is not None}
               for qid, row, srow in zip(self.query_ids, _rows(ids), scores.tolist()) if qid in self.relevant}
        prefix = f"{self.name}_" if self.name else ""
        out = {f"{prefix}mrr@{self.k}": metrics.mrr_at_k(run, self.relevant, self.k),
               f"{prefix}recall@{self.k}": metrics.recall_at_k(run, self.relevant, self.k),
               f"{prefix}ndcg@{self.k}": metrics.ndcg_at_k(run, self.relevant, self.k),
               f"{prefix}flops": metrics.expected_flops(q, d)}
        out.update({f"{prefix}query_nnz": q.nnz / max(1, len(q)), f"{prefix}doc_nnz": d.nnz / max(1, len(d))})
        return {key: float(v) for key, v in out.items()}


def _rows(ids) -> list[list]:
    """Search results as lists of user ids per query (None for padding)."""
    if isinstance(ids, torch.Tensor):
        return [[int(i) if i >= 0 else None for i in row] for row in ids.tolist()]
    return [list(row) for row in ids]
