"""Training losses for learned sparse representations (SPLADE-style models, CSR heads).

Every function accepts either dense tensors of shape (batch, dim) or :class:`~sparse_retrieval.SparseBatch` (whose
``values`` may require grad); all inputs of one call must be of the same kind. Scores are dot products: on
``SparseBatch`` they come from the library's ``sparse_dot`` / ``pairwise_sparse_dot`` ops, on dense tensors from a
plain matmul. ``negatives`` arguments take one batch (one negative per query, same number of rows as the queries)
or a sequence of such batches (several negatives per query).

Sources: Paria et al. 2020 (FLOPs regularizer, quadratic warm-up), SPLADE v2/++ (losses and their combination),
and sentence-transformers' SparseEncoder losses. Each docstring says which formula it follows and where it differs.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F

from .sparse import SparseBatch
from .sparse_dot import pairwise_sparse_dot, sparse_dot

Embeddings = Union[torch.Tensor, SparseBatch]
Negatives = Union[None, Embeddings, Sequence[Embeddings]]

__all__ = [
    "flops", "l1", "RegularizerScheduler", "WarmupSteps", "info_nce", "margin_mse", "kl_distill",
    "SparseRetrievalLoss",
]


# ---- input handling ----------------------------------------------------------------------------------------------
def _check_embeddings(x, name: str) -> None:
    if isinstance(x, SparseBatch):
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a (batch, dim) tensor or a SparseBatch, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D (batch, dim) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")


def _rows(x: Embeddings, name: str) -> int:
    _check_embeddings(x, name)
    n = len(x) if isinstance(x, SparseBatch) else x.shape[0]
    if n == 0:
        raise ValueError(f"{name}: needs at least one row")
    return n


def _negatives_list(negatives: Negatives, name: str = "negatives") -> list:
    if negatives is None:
        return []
    if isinstance(negatives, (torch.Tensor, SparseBatch)):
        return [negatives]
    if isinstance(negatives, (list, tuple)):
        return list(negatives)
    raise TypeError(f"{name}: expected a tensor, a SparseBatch or a sequence of them, got {type(negatives).__name__}")


def _check_same_kind(named: list[tuple[str, Embeddings]], batch: int | None = None) -> None:
    """All of one kind (dense or SparseBatch), one dim, and (if ``batch``) ``batch`` rows each."""
    first_name, first = named[0]
    sparse = isinstance(first, SparseBatch)
    dim = first.dim if sparse else first.shape[1]
    for name, x in named:
        n = _rows(x, name)
        if isinstance(x, SparseBatch) != sparse:
            raise TypeError(f"{name}: mixes SparseBatch and dense tensors (see {first_name}); use one kind")
        if x.device != first.device:
            raise ValueError(f"{name}: on {x.device}, {first_name} on {first.device}")
        d = x.dim if sparse else x.shape[1]
        if d != dim:
            raise ValueError(f"{name}: dim {d} differs from {first_name}'s dim {dim}")
        if batch is not None and n != batch:
            raise ValueError(f"{name}: has {n} rows, expected {batch} (one per query)")


def _all_pairs(q: Embeddings, d: Embeddings) -> torch.Tensor:
    """(len(q), len(d)) float32 dot products."""
    if isinstance(q, SparseBatch):
        return sparse_dot(q, d)
    return q.float() @ d.float().T


def _row_pairs(a: Embeddings, b: Embeddings) -> torch.Tensor:
    """(len(a),) float32 dot product of row i with row i."""
    if isinstance(a, SparseBatch):
        return pairwise_sparse_dot(a, b)
    return (a.float() * b.float()).sum(1)


# ---- regularizers ------------------------------------------------------------------------------------------------
def _mean_abs_per_dim(x: Embeddings) -> torch.Tensor:
    n = _rows(x, "x")
    if isinstance(x, SparseBatch):
        acc = torch.zeros(x.dim, dtype=torch.float32, device=x.device)
        return acc.index_add(0, x.indices.long(), x.values.float().abs()) / n
    return x.float().abs().mean(0)


def flops(x: Embeddings) -> torch.Tensor:
    """FLOPs regularizer (Paria et al. 2020): ``sum_j (mean_i |x_ij|)^2``, a float32 scalar.

    Same as SPLADE's ``FLOPS``. sentence-transformers' ``FlopsLoss`` omits the absolute value (it assumes
    non-negative activations) and with ``threshold`` counts only rows with more than that many non-zeros; here
    every row counts.
    """
    return _mean_abs_per_dim(x).square().sum()


def l1(x: Embeddings) -> torch.Tensor:
    """L1 regularizer: ``mean_i sum_j |x_ij|``, a float32 scalar (SPLADE's ``L1``)."""
    n = _rows(x, "x")
    if isinstance(x, SparseBatch):
        return x.values.float().abs().sum() / n
    return x.float().abs().sum(1).mean()


_REGULARIZERS: dict[str, Callable[[Embeddings], torch.Tensor]] = {"flops": flops, "l1": l1}


class RegularizerScheduler:
    """Quadratic warm-up of a regularizer weight: ``lam * min(1, (t / warmup_steps)^2)`` at step ``t``.

    As in Paria et al. and SPLADE. ``warmup_steps=0`` gives ``lam`` from the first step. Call it with a step
    (``sched(t)``), or let it count: ``step()`` advances by one and returns the new weight, ``value`` is the weight
    at the current ``t``.
    """

    def __init__(self, lam: float, warmup_steps: int = 0):
        if not isinstance(lam, (int, float)) or isinstance(lam, bool) or lam < 0:
            raise ValueError(f"lam: expected a number >= 0, got {lam!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected an int >= 0, got {warmup_steps!r}")
        self.lam = float(lam)
        self.warmup_steps = warmup_steps
        self.t = 0

    def __call__(self, t: int) -> float:
        if t < 0:
            raise ValueError(f"t: step must be >= 0, got {t}")
        if self.warmup_steps == 0:
            return self.lam
        return self.lam * min(1.0, (t / self.warmup_steps) ** 2)

    @property
    def value(self) -> float:
        return self(self.t)

    def step(self) -> float:
        self.t += 1
        return self.value

    def state_dict(self) -> dict:
        return {"lam": self.lam, "warmup_steps": self.warmup_steps, "t": self.t}

    def load_state_dict(self, state: dict) -> None:
        self.lam, self.warmup_steps, self.t = float(state["lam"]), int(state["warmup_steps"]), int(state["t"])

    def __repr__(self) -> str:
        return f"RegularizerScheduler(lam={self.lam}, warmup_steps={self.warmup_steps}, t={self.t})"


class WarmupSteps:
    """Mixin of the loss modules whose regularizer weights warm up (``_schedulers()`` names them). By default each
    forward in training mode is a step; after ``count_optimizer_steps(optimizer)`` only ``optimizer.step()`` is
    (gradient accumulation then warms up at the optimizer's pace). The step counts are part of the module's
    ``state_dict`` (``get_extra_state``), so saving and loading the training state resumes the warm-up."""

    _by_optimizer = False

    def _schedulers(self) -> dict[str, RegularizerScheduler]:
        raise NotImplementedError

    def count_optimizer_steps(self, optimizer: torch.optim.Optimizer):
        """Advances the warm-up once per ``optimizer.step()`` from now on; returns the hook's handle (``remove()``
        goes back to counting forwards)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._by_optimizer = True
        handle = optimizer.register_step_post_hook(lambda *_: self._advance())
        module = self

        class Handle:
            def remove(self):
                handle.remove()
                module._by_optimizer = False

        return Handle()

    def _advance(self) -> None:
        for s in self._schedulers().values():
            s.step()

    def _forward_done(self) -> None:
        if self.training and not self._by_optimizer:
            self._advance()

    def get_extra_state(self) -> dict:
        return {name: s.state_dict() for name, s in self._schedulers().items()}

    def set_extra_state(self, state: dict) -> None:
        for name, s in self._schedulers().items():
            s.load_state_dict(state[name])


# ---- ranking losses ----------------------------------------------------------------------------------------------
def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature!r}")


def info_nce(q: Embeddings, pos: Embeddings, negatives: Negatives = None, temperature: float = 1.0) -> torch.Tensor:
    """In-batch InfoNCE: cross-entropy of each query against every document in the batch, its own positive first.

    Candidates for query i are all positives and all hard negatives of the batch (``[pos; neg_1; ...; neg_m]``,
    ``B * (1 + m)`` documents), scored by dot product / ``temperature``; the target is ``pos[i]``. Mean over
    queries. This is sentence-transformers' ``SparseMultipleNegativesRankingLoss`` (dot product, ``scale = 1 /
    temperature``; its default scale 1.0 is ``temperature=1``). SPLADE's ``InBatchPairwiseNLL`` differs: it
    scores each query only against the batch positives plus its *own* negative.
    """
    _check_temperature(temperature)
    negs = _negatives_list(negatives)
    b = _rows(q, "q")
    _check_same_kind([("q", q), ("pos", pos)] + [(f"negatives[{i}]", n) for i, n in enumerate(negs)], batch=b)
    docs = SparseBatch.cat([pos, *negs]) if isinstance(pos, SparseBatch) else torch.cat([pos, *negs])
    scores = _all_pairs(q, docs) / temperature
    return F.cross_entropy(scores, torch.arange(b, device=scores.device))


def _student_scores(q, pos, negatives) -> torch.Tensor:
    """(B, 1 + m) float32 scores of each query with its positive and its m negatives."""
    negs = _negatives_list(negatives)
    if not negs:
        raise ValueError("negatives: need at least one negative per query")
    b = _rows(q, "q")
    _check_same_kind([("q", q), ("pos", pos)] + [(f"negatives[{i}]", n) for i, n in enumerate(negs)], batch=b)
    return torch.stack([_row_pairs(q, d) for d in [pos, *negs]], 1)


def _check_teacher(t: torch.Tensor, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    return t.float()


def margin_mse(q: Embeddings, pos: Embeddings, negatives: Negatives, teacher_margin: torch.Tensor) -> torch.Tensor:
    """MarginMSE distillation (Hofstaetter et al.): ``mean((s(q, d+) - s(q, d-) - teacher_margin)^2)``.

    ``teacher_margin`` is the teacher's ``t+ - t-``: shape (B,) for one negative per query, (B, m) for m negatives
    (then the mean runs over all B * m margins). Same as SPLADE's ``MarginMSELoss`` and sentence-transformers'
    ``SparseMarginMSELoss`` (which takes the margins as labels).
    """
    s = _student_scores(q, pos, negatives)
    margins = s[:, :1] - s[:, 1:]
    b, m = margins.shape
    shape = (b,) if m == 1 and getattr(teacher_margin, "dim", lambda: 2)() == 1 else (b, m)
    t = _check_teacher(teacher_margin, "teacher_margin", shape).reshape(b, m).to(margins.device)
    return F.mse_loss(margins, t)


def kl_distill(q: Embeddings, pos: Embeddings, negatives: Negatives, teacher_scores: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """KL distillation over each query's candidates ``[pos, neg_1, ..., neg_m]``.

    ``KL(softmax(t / T) || softmax(s / T)) * T^2``, summed over candidates and averaged over queries;
    ``teacher_scores`` has shape (B, 1 + m), positive first. The ``T^2`` factor and the temperature follow
    sentence-transformers' ``SparseDistillKLDivLoss`` (whose default is T = 2); at the default T = 1 this is
    SPLADE's ``DistilKLLoss``.
    """
    _check_temperature(temperature)
    s = _student_scores(q, pos, negatives)
    t = _check_teacher(teacher_scores, "teacher_scores", tuple(s.shape)).to(s.device)
    log_p_student = F.log_softmax(s / temperature, 1)
    log_p_teacher = F.log_softmax(t / temperature, 1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(1)
    return kl.mean() * temperature ** 2


# ---- SPLADE combination ------------------------------------------------------------------------------------------
class SparseRetrievalLoss(WarmupSteps, torch.nn.Module):
    """``ranking_loss + lambda_q(t) * Reg_q(q) + lambda_d(t) * mean_b Reg_d(docs_b)``, the SPLADE combination.

    ``ranking_loss`` is called as ``ranking_loss(q, pos, negatives, **kwargs)`` (e.g. :func:`info_nce`,
    :func:`margin_mse`, :func:`kl_distill`). The document regularizer is applied to each document batch
    (positives, then each batch of negatives) separately and averaged, as SPLADE does for ``(Reg(d+) + Reg(d-)) / 2``;
    sentence-transformers' ``SpladeLoss`` instead regularizes the concatenation of all document batches, which
    differs for FLOPs (the square of a mean is not the mean of squares). Both weights follow
    :class:`RegularizerScheduler`'s quadratic warm-up over ``warmup_steps``; each call in training mode advances
    the step, or each optimizer step after ``count_optimizer_steps(optimizer)``; the steps are saved in
    ``state_dict``. ``query_regularizer=None`` (or ``lambda_q=0``) skips the query term (inference-free SPLADE).
    After each call ``last`` holds the float components (``ranking``, ``reg_q``, ``reg_d``, ``lambda_q``,
    ``lambda_d``).
    """

    def __init__(self, ranking_loss: Callable[..., torch.Tensor], lambda_q: float, lambda_d: float,
                 query_regularizer: str | None = "flops", document_regularizer: str = "flops",
                 warmup_steps: int = 0):
        super().__init__()
        if not callable(ranking_loss):
            raise TypeError(f"ranking_loss: expected a callable, got {type(ranking_loss).__name__}")
        if query_regularizer is not None and query_regularizer not in _REGULARIZERS:
            raise ValueError(f"query_regularizer: expected 'flops', 'l1' or None, got {query_regularizer!r}")
        if document_regularizer not in _REGULARIZERS:
            raise ValueError(f"document_regularizer: expected 'flops' or 'l1', got {document_regularizer!r}")
        self.ranking_loss = ranking_loss
        self.query_regularizer = query_regularizer
        self.document_regularizer = document_regularizer
        self.lambda_q = RegularizerScheduler(lambda_q, warmup_steps)
        self.lambda_d = RegularizerScheduler(lambda_d, warmup_steps)
        self.last: dict[str, float] = {}

    def _schedulers(self) -> dict[str, RegularizerScheduler]:
        return {"lambda_q": self.lambda_q, "lambda_d": self.lambda_d}

    def forward(self, q: Embeddings, pos: Embeddings, negatives: Negatives = None, **kwargs) -> torch.Tensor:
        ranking = self.ranking_loss(q, pos, negatives, **kwargs)
        docs = [pos, *_negatives_list(negatives)]
        lam_q, lam_d = self.lambda_q.value, self.lambda_d.value
        reg_d = torch.stack([_REGULARIZERS[self.document_regularizer](d) for d in docs]).mean()
        total = ranking + lam_d * reg_d
        reg_q = torch.zeros((), device=reg_d.device)
        if self.query_regularizer is not None and lam_q > 0:
            reg_q = _REGULARIZERS[self.query_regularizer](q)
            total = total + lam_q * reg_q
        self._forward_done()
        self.last = {"ranking": ranking.item(), "reg_q": reg_q.item(), "reg_d": reg_d.item(),
                     "lambda_q": lam_q, "lambda_d": lam_d}
        return total
