"""Top-k selection (``topk``) and the differentiable top-k sparsifier (``topk_sparsify``).

``topk`` is the op ``torch.ops.sparse_retrieval.topk`` (CPU SIMD and CUDA kernels) with input checks, ``out=``
handling and a fake implementation for torch.compile; the op's autograd is registered in C++ (csrc/ops/topk.cpp),
where it costs less per call than a Python autograd kernel. Its meaning is ``reference.topk``: values equal
``torch.topk``'s, equal values by increasing index, NaN above every number (so last when ``largest=False``).
"""
from __future__ import annotations

import torch

from ._fake import fake
from .sparse import SparseBatch

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(x, k, dim) -> int:
    """Validates the arguments of topk and returns the length of the selected dimension."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x: dtype {x.dtype} is not supported (expected float32, float16 or bfloat16)")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim: expected an int, got {type(dim).__name__}")
    ndim = max(x.dim(), 1)
    if not -ndim <= dim < ndim:
        raise IndexError(f"dim: {dim} is out of range for a tensor with {x.dim()} dimensions")
    n = x.shape[dim] if x.dim() else 1
    if not 0 <= k <= n:
        raise ValueError(f"k: must lie in [0, {n}] (the size of dim {dim}), got {k}")
    return n


def _out_shape(x: torch.Tensor, k: int, dim: int) -> list[int]:
    if x.dim() == 0:
        return [] if k == 1 else [k]
    shape = list(x.shape)
    shape[dim] = k
    return shape


def topk(x: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True, *,
         out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest (``largest=False``: smallest) entries of ``x`` along ``dim``: ``(values, indices)``.

    x: float32, float16 or bfloat16, any shape, CPU or CUDA, any strides. Values keep x's dtype and equal
    ``torch.topk``'s; indices are int64, equal values ordered by increasing index; NaN ranks above +inf.
    ``sorted=False`` returns the same selection in an unspecified order. ``out=(values, indices)``: tensors of
    the result's shape, dtypes and device to write into (they are returned). Differentiable with respect to x.
    """
    _check(x, k, dim)
    if out is None:
        return torch.ops.sparse_retrieval.topk(x, k, dim, largest, sorted)
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
        raise TypeError("out: expected a tuple (values, indices) of two tensors")
    shape = torch.Size(_out_shape(x, k, dim))
    for name, t, dtype in (("values", out[0], x.dtype), ("indices", out[1], torch.int64)):
        if t.dtype != dtype or t.device != x.device or t.shape != shape:
            raise ValueError(f"out {name}: expected dtype {dtype}, device {x.device} and shape {tuple(shape)}, got "
                             f"{t.dtype}, {t.device} and {tuple(t.shape)}")
    if torch.is_grad_enabled() and x.requires_grad:
        raise ValueError("out: topk with out= does not support autograd (x requires grad)")
    values, indices = torch.ops.sparse_retrieval.topk(x, k, dim, largest, sorted)
    out[0].copy_(values)
    out[1].copy_(indices)
    return out[0], out[1]


@fake("topk")
def _topk_fake(x, k, dim=-1, largest=True, sorted=True):
    _check(x, k, dim)
    shape = _out_shape(x, k, dim)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64)


def topk_sparsify(x: torch.Tensor, k: int, by: str = "value", as_sparse: bool = False):
    """Keeps the k largest entries of each row (last dimension) of x, by ``value`` or by ``abs``, and zeros the
    rest; ties go to the lower index. The top-k activation of a sparse autoencoder: differentiable, the gradient
    reaches the kept entries only. ``k`` above the row length keeps everything.

    as_sparse=True (x of shape (rows, dim)) returns a ``SparseBatch`` holding exactly min(k, dim) entries per row
    (kept zeros included), in increasing column order, whose values carry the gradient.
    """
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    if k < 0:
        raise ValueError(f"k: must be >= 0, got {k}")
    if by not in ("value", "abs"):
        raise ValueError(f"by: expected 'value' or 'abs', got {by!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES + (torch.float64,):
        raise TypeError(f"x: dtype {x.dtype} is not supported (expected float32, float16, bfloat16 or float64)")
    if x.dim() < 1:
        raise ValueError("x: expected at least one dimension")
    if as_sparse and x.dim() != 2:
        raise ValueError(f"x: as_sparse=True needs a 2-D (rows, dim) tensor, got shape {tuple(x.shape)}")
    k = min(k, x.shape[-1])
    score = x.detach().abs() if by == "abs" else x.detach()
    if x.dtype == torch.float64:  # no float64 kernel (gradcheck uses float64): select by a stable sort instead
        idx = torch.sort(score, dim=-1, descending=True, stable=True)[1].narrow(-1, 0, k)
    else:
        idx = torch.ops.sparse_retrieval.topk(score, k, -1, True, False)[1]
    if as_sparse:
        idx = idx.sort(dim=-1)[0]
        indptr = torch.arange(x.shape[0] + 1, device=x.device) * k
        return SparseBatch(indptr, idx.reshape(-1), x.gather(-1, idx).reshape(-1), x.shape[1], check=False)
    return torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx))
