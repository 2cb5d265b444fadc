"""Sparse x sparse dot products of `SparseBatch` rows, differentiable with respect to both batches' values.

``sparse_dot(q, d)`` scores every row of ``q`` against every row of ``d`` (a dense float32 (len(q), len(d))
matrix); ``pairwise_sparse_dot(a, b)`` scores row i with row i. Definitions: ``reference.sparse_dot`` and
``reference.pairwise_sparse_dot``. Products accumulate in float32 whatever the value dtype.
"""
from __future__ import annotations

import torch

from ._fake import fake
from .sparse import SparseBatch

_ops = torch.ops.sparse_retrieval


def _operands(a: SparseBatch, b: SparseBatch, names: tuple[str, str]) -> tuple:
    """The CSR tensors of a and b with shared index and value dtypes, after checking they can be multiplied."""
    for x, name in zip((a, b), names):
        if not isinstance(x, SparseBatch):
            raise TypeError(f"{name}: expected a SparseBatch, got {type(x).__name__}")
    if a.dim != b.dim:
        raise ValueError(f"{names[0]} and {names[1]}: dims differ ({a.dim} vs {b.dim})")
    if a.device != b.device:
        raise ValueError(f"{names[0]} and {names[1]}: devices differ ({a.device} vs {b.device})")
    # Mixed value dtypes meet in float32; mixed index dtypes in int64. Casting values keeps the autograd graph.
    vdtype = a.dtype if a.dtype == b.dtype else torch.float32
    idtype = torch.int32 if a.indices.dtype == b.indices.dtype == torch.int32 else torch.int64
    return (a.indptr, a.indices.to(idtype), a.values.to(vdtype),
            b.indptr, b.indices.to(idtype), b.values.to(vdtype), a.dim)


def sparse_dot(q: SparseBatch, d: SparseBatch) -> torch.Tensor:
    """All pairs: ``out[i, j] = <q_i, d_j>``, float32 of shape (len(q), len(d)), on q's device."""
    return _ops.sparse_dot(*_operands(q, d, ("q", "d")))


def pairwise_sparse_dot(a: SparseBatch, b: SparseBatch) -> torch.Tensor:
    """Row with row: ``out[i] = <a_i, b_i>``, float32 of shape (len(a),)."""
    if isinstance(a, SparseBatch) and isinstance(b, SparseBatch) and len(a) != len(b):
        raise ValueError(f"a and b: row counts differ ({len(a)} vs {len(b)})")
    return _ops.pairwise_sparse_dot(*_operands(a, b, ("a", "b")))


# ---- fake implementations (torch.compile) ----------------------------------------------------------------------


@fake("sparse_dot")
def _(a_indptr, a_indices, a_values, b_indptr, b_indices, b_values, dim):
    return a_values.new_empty((a_indptr.shape[0] - 1, b_indptr.shape[0] - 1), dtype=torch.float32)


@fake("pairwise_sparse_dot")
def _(a_indptr, a_indices, a_values, b_indptr, b_indices, b_values, dim):
    return a_values.new_empty((a_indptr.shape[0] - 1,), dtype=torch.float32)


@fake("sparse_dot_backward")
def _(grad, a_indptr, a_indices, b_indptr, b_indices, b_values, dim):
    return b_values.new_empty(a_indices.shape, dtype=torch.float32)


@fake("pairwise_sparse_dot_backward")
def _(grad, a_indptr, a_indices, b_indptr, b_indices, b_values, dim):
    return b_values.new_empty(a_indices.shape, dtype=torch.float32)


# ---- autograd ----------------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])
    ctx.dim = inputs[6]


def _backward(grad_op, all_pairs: bool):
    """Backward of an op scoring a against b: each operand's value gradient comes from grad_op with the operands
    swapped for b (and, for all pairs, the incoming gradient transposed)."""
    def backward(ctx, grad):
        a_ptr, a_idx, a_val, b_ptr, b_idx, b_val = ctx.saved_tensors
        ga = gb = None
        if ctx.needs_input_grad[2]:
            ga = grad_op(grad, a_ptr, a_idx, b_ptr, b_idx, b_val, ctx.dim).to(a_val.dtype)
        if ctx.needs_input_grad[5]:
            grad_b = grad.t().contiguous() if all_pairs else grad
            gb = grad_op(grad_b, b_ptr, b_idx, a_ptr, a_idx, a_val, ctx.dim).to(b_val.dtype)
        return None, None, ga, None, None, gb, None

    return backward


torch.library.register_autograd("sparse_retrieval::sparse_dot", _backward(_ops.sparse_dot_backward, True),
                                setup_context=_setup_context)
torch.library.register_autograd("sparse_retrieval::pairwise_sparse_dot",
                                _backward(_ops.pairwise_sparse_dot_backward, False), setup_context=_setup_context)
