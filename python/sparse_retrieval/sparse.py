"""`SparseBatch`: the one type for batches of sparse vectors (CSR), on CPU or CUDA."""
from __future__ import annotations

import math
import numbers
import operator
import re
from typing import Iterable, Sequence

import torch

VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def _as_int(x, name: str) -> int:
    """Python/numpy/0-d tensor integers (not bools, not floats) as int."""
    if isinstance(x, bool):
        raise TypeError(f"{name}: expected an int, got bool")
    try:
        return operator.index(x)
    except TypeError as exc:
        raise TypeError(f"{name}: expected an int, got {type(x).__name__}") from exc


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.as_tensor(x)
    except Exception as exc:  # numpy object arrays, ragged lists...
        raise TypeError(f"{name}: expected a tensor or array, got {type(x).__name__}") from exc


class SparseBatch:
    """A batch of ``n`` sparse vectors of dimension ``dim`` in CSR form.

    ``indptr`` (int64, ``n + 1``) delimits rows; ``indices`` (int32 or int64) holds the column of each non-zero,
    strictly increasing within a row; ``values`` (float32, float16 or bfloat16) holds its weight. All three live on
    one device. Construction validates everything (``check=False`` skips it for trusted inputs); ``sort=True``
    sorts each row's indices and sums duplicated ones instead of rejecting them.
    """

    __slots__ = ("indptr", "indices", "values", "dim")

    def __init__(self, indptr, indices, values, dim: int, *, check: bool = True, sort: bool = False):
        indptr = _as_tensor(indptr, "indptr")
        indices = _as_tensor(indices, "indices")
        values = _as_tensor(values, "values")
        dim = _as_int(dim, "dim")
        if dim < 0:
            raise ValueError(f"dim: must be >= 0, got {dim}")
        if check or sort:
            _check_layout(indptr, indices, values, dim)
        if sort:
            indptr, indices, values = _sort_and_merge(indptr, indices, values, dim)
        elif check:
            _check_sorted(indptr, indices)
        if check:
            _check_values(values)
        # Kernels read raw pointers: keep the storage dense.
        self.indptr = indptr.contiguous()
        self.indices = indices.contiguous()
        self.values = values.contiguous()
        self.dim = dim

    # ---- shape and storage -------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self.indptr.numel() - 1, self.dim)

    def __len__(self) -> int:
        return self.indptr.numel() - 1

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    def row_nnz(self) -> torch.Tensor:
        """Non-zeros per row, int64."""
        return self.indptr[1:] - self.indptr[:-1]

    def row_ids(self) -> torch.Tensor:
        """The row of each stored non-zero, int64."""
        return torch.repeat_interleave(torch.arange(len(self), device=self.device), self.row_nnz(),
                                       output_size=self.nnz)

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.indptr, self.indices, self.values))

    def __repr__(self) -> str:
        return (f"SparseBatch(rows={len(self)}, dim={self.dim}, nnz={self.nnz}, values={self.dtype}, "
                f"indices={self.indices.dtype}, device={self.device})")

    def to(self, device=None, dtype: torch.dtype | None = None, index_dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> "SparseBatch":
        """Moves to ``device`` and/or casts values to ``dtype`` and indices to ``index_dtype``.
        A dtype as the first argument casts values, as ``Tensor.to(dtype)`` does."""
        if isinstance(device, torch.dtype):
            if dtype is not None:
                raise TypeError("to: dtype given twice")
            device, dtype = None, device
        if dtype is not None and dtype not in VALUE_DTYPES:
            raise TypeError(f"dtype: expected one of {VALUE_DTYPES}, got {dtype}")
        if index_dtype is not None and index_dtype not in INDEX_DTYPES:
            raise TypeError(f"index_dtype: expected int32 or int64, got {index_dtype}")
        if index_dtype == torch.int32 and self.dim > 2**31 - 1:
            raise ValueError(f"index_dtype: int32 cannot hold indices of dim {self.dim}")
        return SparseBatch(
            self.indptr.to(device=device, non_blocking=non_blocking),
            self.indices.to(device=device, dtype=index_dtype, non_blocking=non_blocking),
            cast_values(self.values.to(device=device, non_blocking=non_blocking), dtype, "values"),
            self.dim, check=False)

    def cuda(self) -> "SparseBatch":
        return self.to("cuda")

    def cpu(self) -> "SparseBatch":
        return self.to("cpu")

    # ---- rows --------------------------------------------------------------------------------------------------
    def __getitem__(self, rows) -> "SparseBatch":
        """Row selection: an int, a slice (any step), or a sequence/tensor of row numbers or a boolean mask."""
        n = len(self)
        if isinstance(rows, torch.Tensor) and rows.dim() == 0:
            rows = rows.item()
        if isinstance(rows, bool):
            raise IndexError("rows: a single bool is not a row number (use a boolean mask of one entry per row)")
        if isinstance(rows, numbers.Integral):  # int, numpy integers
            row = int(rows)
            if not -n <= row < n:
                raise IndexError(f"row {row} out of range for {n} rows")
            rows = slice(row % n, row % n + 1)
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step == 1:
                stop = max(stop, start)
                lo, hi = self.indptr[[start, stop]].tolist()
                return SparseBatch(self.indptr[start:stop + 1] - lo, self.indices[lo:hi], self.values[lo:hi],
                                   self.dim, check=False)
            rows = torch.arange(start, stop, step, device=self.device)
        rows = _as_tensor(rows, "rows").to(self.device)
        if rows.dtype == torch.bool:
            if rows.shape != (n,):
                raise IndexError(f"boolean row mask has shape {tuple(rows.shape)}, expected ({n},)")
            rows = rows.nonzero().flatten()
        if rows.dim() != 1 or (rows.numel() and rows.dtype not in (torch.int32, torch.int64)):
            raise IndexError("rows: expected an int, a slice, a 1-D integer sequence or a boolean mask")
        rows = rows.long()
        if rows.numel():
            lo, hi = torch.stack([rows.min(), rows.max()]).tolist()
            if lo < -n or hi >= n:
                raise IndexError(f"row numbers out of range for {n} rows (got {lo if lo < -n else hi})")
        rows = rows % max(n, 1)
        counts = self.row_nnz()[rows]
        indptr = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=self.device)
        torch.cumsum(counts, 0, out=indptr[1:])
        total = int(indptr[-1])
        # Position of every kept non-zero in the source arrays.
        starts = torch.repeat_interleave(self.indptr[:-1][rows] - indptr[:-1], counts, output_size=total)
        src = starts + torch.arange(total, device=self.device)
        return SparseBatch(indptr, self.indices[src], self.values[src], self.dim, check=False)

    @staticmethod
    def cat(batches: Sequence["SparseBatch"]) -> "SparseBatch":
        """Concatenates rows of batches of the same dim, device and dtypes."""
        batches = list(batches)
        if not batches:
            raise ValueError("batches: need at least one SparseBatch")
        first = batches[0]
        for i, b in enumerate(batches):
            if not isinstance(b, SparseBatch):
                raise TypeError(f"batches[{i}]: expected SparseBatch, got {type(b).__name__}")
            if b.dim != first.dim:
                raise ValueError(f"batches[{i}]: dim {b.dim} differs from batches[0].dim {first.dim}")
            if b.device != first.device or b.dtype != first.dtype or b.indices.dtype != first.indices.dtype:
                raise ValueError(f"batches[{i}]: device/dtypes differ from batches[0] ({b!r} vs {first!r})")
        offsets = torch.tensor([0] + [b.nnz for b in batches], device=first.device).cumsum(0)
        indptr = torch.cat([first.indptr[:1]] + [b.indptr[1:] + offsets[i] for i, b in enumerate(batches)])
        return SparseBatch(indptr, torch.cat([b.indices for b in batches]), torch.cat([b.values for b in batches]),
                           first.dim, check=False)

    # ---- constructors ------------------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, x: torch.Tensor, k: int | None = None, by: str = "value",
                   index_dtype: torch.dtype = torch.int32) -> "SparseBatch":
        """From a dense (n, dim) tensor: its non-zeros, or with ``k`` the ``k`` largest entries of each row
        (by ``value`` or ``abs``; ties to the lower column) among its non-zeros."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"x: expected a 2-D (rows, dim) tensor, got shape {tuple(x.shape)}")
        if x.dtype not in VALUE_DTYPES:
            raise TypeError(f"x: dtype {x.dtype} is not one of {VALUE_DTYPES}")
        if by not in ("value", "abs"):
            raise ValueError(f"by: expected 'value' or 'abs', got {by!r}")
        if x.numel() and not bool(torch.isfinite(x).all()):
            raise ValueError("x: contains NaN or Inf")
        keep = x != 0
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
                raise ValueError(f"k: expected an int >= 0, got {k!r}")
            from .topk import topk  # the library's kernel (CPU or CUDA); topk imports this module

            kk = min(int(k), x.shape[1])
            # Zeros rank below every non-zero, so a row with fewer than k non-zeros keeps all of them.
            score = (x.abs() if by == "abs" else x).masked_fill(~keep, -math.inf)
            _, top = topk(score, kk, dim=1, sorted=False)
            mask = torch.zeros_like(keep)
            mask.scatter_(1, top, True)
            keep &= mask
        rows, cols = keep.nonzero(as_tuple=True)
        indptr = torch.zeros(x.shape[0] + 1, dtype=torch.int64, device=x.device)
        torch.cumsum(keep.sum(1), 0, out=indptr[1:])
        return cls(indptr, cols.to(index_dtype), x[rows, cols], x.shape[1])

    @classmethod
    def from_torch(cls, t: torch.Tensor, *, sort: bool = False) -> "SparseBatch":
        """From a 2-D torch sparse tensor (CSR or COO, as sentence-transformers' SparseEncoder returns)."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"t: expected a torch sparse tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"t: expected 2 dimensions, got shape {tuple(t.shape)}")
        if t.layout in (torch.sparse_csr, torch.sparse_coo) and t.dense_dim() != 0:
            raise ValueError(f"t: hybrid sparse tensors (dense_dim={t.dense_dim()}) are not supported")
        if t.layout == torch.sparse_csr:
            return cls(t.crow_indices().long(), t.col_indices(), t.values(), t.shape[1], sort=sort)
        if t.layout == torch.sparse_coo:
            t = t.coalesce()  # sorts by (row, col) and sums duplicates, as COO semantics define
            row, col = t.indices()
            if row.numel():
                lo, hi = row[[0, -1]].tolist()  # sorted by coalesce
                if lo < 0 or hi >= t.shape[0]:
                    raise ValueError(f"t: row index {lo if lo < 0 else hi} out of range for {t.shape[0]} rows")
            return cls(_indptr_from_sorted_rows(row, t.shape[0]), col, t.values(), t.shape[1], sort=sort)
        raise ValueError(f"t: layout {t.layout} is not supported (use sparse_csr or sparse_coo, or from_dense)")

    @classmethod
    def from_scipy(cls, m, *, sort: bool = False, dtype: torch.dtype | None = None) -> "SparseBatch":
        """From any 2-D scipy.sparse matrix or array (converted to CSR; duplicates of COO input are summed).
        The batch owns copies of the arrays, so later changes to ``m`` do not reach it."""
        import numpy as np
        import scipy.sparse as sp

        if not sp.issparse(m):
            raise TypeError(f"m: expected a scipy.sparse matrix, got {type(m).__name__}")
        if m.ndim != 2:
            raise ValueError(f"m: expected 2 dimensions, got shape {m.shape}")
        m = m.tocsr()
        values = torch.from_numpy(np.array(m.data))
        if dtype is not None:
            values = cast_values(values, dtype, "m")
        elif values.dtype == torch.float64:
            values = values.float()
        indices = torch.from_numpy(np.array(m.indices))
        return cls(torch.from_numpy(m.indptr.astype(np.int64)), indices, values, m.shape[1], sort=sort)

    @classmethod
    def from_lists(cls, rows: Iterable, dim: int, *, dtype: torch.dtype = torch.float32,
                   index_dtype: torch.dtype = torch.int32, sort: bool = False) -> "SparseBatch":
        """From an iterable of ``(indices, values)`` pairs, one per row."""
        idx_parts, val_parts, counts = [], [], []
        for r, row in enumerate(rows):
            try:
                ind, val = row
            except (TypeError, ValueError) as exc:
                raise TypeError(f"rows[{r}]: expected an (indices, values) pair") from exc
            ind = _as_tensor(ind, f"rows[{r}] indices").reshape(-1)
            val = _as_tensor(val, f"rows[{r}] values").reshape(-1)
            if ind.numel() != val.numel():
                raise ValueError(f"rows[{r}]: {ind.numel()} indices but {val.numel()} values")
            if ind.numel() and (ind.dtype.is_floating_point or ind.dtype == torch.bool or ind.is_complex()):
                raise TypeError(f"rows[{r}] indices: expected integers, got {ind.dtype}")
            idx_parts.append(ind.to(torch.int64))
            val_parts.append(cast_values(val, dtype, f"rows[{r}] values"))
            counts.append(ind.numel())
        indptr = torch.zeros(len(counts) + 1, dtype=torch.int64)
        torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0, out=indptr[1:])
        indices = torch.cat(idx_parts) if idx_parts else torch.zeros(0, dtype=torch.int64)
        values = torch.cat(val_parts) if val_parts else torch.zeros(0, dtype=dtype)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= dim):
            raise ValueError(f"indices: values must lie in [0, {dim}), got min {int(indices.min())}, "
                             f"max {int(indices.max())}")
        return cls(indptr, indices.to(index_dtype), values, dim, sort=sort)

    # ---- conversions -------------------------------------------------------------------------------------------
    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        out = torch.zeros(len(self), self.dim, dtype=dtype or self.dtype, device=self.device)
        out[self.row_ids(), self.indices.long()] = self.values.to(out.dtype)
        return out

    def to_torch(self, layout: torch.layout = torch.sparse_csr) -> torch.Tensor:
        if layout == torch.sparse_csr:
            # Already validated (unless built with check=False); passing the flag also silences torch's warning.
            return torch.sparse_csr_tensor(self.indptr, self.indices.long(), self.values, size=self.shape,
                                           check_invariants=False)
        if layout == torch.sparse_coo:
            idx = torch.stack([self.row_ids(), self.indices.long()])
            return torch.sparse_coo_tensor(idx, self.values, size=self.shape, is_coalesced=True,
                                           check_invariants=False)
        raise ValueError(f"layout: expected torch.sparse_csr or torch.sparse_coo, got {layout}")

    def to_scipy(self):
        import scipy.sparse as sp

        values = self.values.detach().cpu()
        if values.dtype != torch.float32:  # numpy has no bfloat16, scipy.sparse no float16
            values = values.float()
        return sp.csr_matrix((values.numpy(), self.indices.cpu().numpy(), self.indptr.cpu().numpy()),
                             shape=self.shape)

    def to_lists(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ptr = self.indptr.tolist()
        return [(self.indices[a:b], self.values[a:b]) for a, b in zip(ptr[:-1], ptr[1:])]


# ---- validation ----------------------------------------------------------------------------------------------
def as_sparse_batch(x, name: str) -> SparseBatch:
    """``x`` as a SparseBatch: a SparseBatch as it is; a torch sparse tensor (CSR or COO, e.g. sentence-transformers'
    ``SparseEncoder.encode`` output; a 1-D COO is one vector) or scipy.sparse matrix (duplicates summed, columns
    sorted); a dense 1-D or 2-D torch tensor or numpy array (its non-zeros; float64 becomes float32). Errors name
    ``name``."""
    import numpy as np

    if isinstance(x, SparseBatch):
        return x
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if isinstance(x, torch.Tensor):
        if x.layout in (torch.sparse_csr, torch.sparse_coo):
            one = x.layout == torch.sparse_coo and x.dim() == 1  # sentence-transformers' encode of one text
            return _named(name, SparseBatch.from_torch, x.unsqueeze(0) if one else x, sort=True)
        if x.layout != torch.strided:
            raise TypeError(f"{name}: sparse layout {x.layout} is not supported (CSR, COO or dense)")
        if x.dim() not in (1, 2):
            raise ValueError(f"{name}: a dense tensor must be 1-D (one vector) or 2-D (rows, dim), got shape "
                             f"{tuple(x.shape)}")
        if x.dtype == torch.float64:
            x = cast_values(x, torch.float32, name)
        if x.dtype not in VALUE_DTYPES:
            raise TypeError(f"{name}: dtype {x.dtype} is not one of {VALUE_DTYPES} (or float64)")
        return _named(name, SparseBatch.from_dense, x.reshape(-1, x.shape[-1]) if x.dim() == 1 else x)
    if type(x).__module__.startswith("scipy.sparse"):
        return _named(name, SparseBatch.from_scipy, x, sort=True,
                      dtype=torch.float32 if x.dtype == np.float64 else None)
    raise TypeError(f"{name}: expected a SparseBatch, a torch sparse or dense tensor, a numpy array or a "
                    f"scipy.sparse matrix, got {type(x).__name__}")


def _named(name: str, convert, x, **kw) -> SparseBatch:
    """``convert(x, **kw)``, its errors naming the caller's argument ``name`` instead of the converter's own."""
    try:
        return convert(x, **kw)
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        raise type(exc)(re.sub(r"^(x|t|m):", f"{name}:", msg) if re.match(r"(x|t|m):", msg) else f"{name}: {msg}") \
            from None


def _check_layout(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, dim: int) -> None:
    if indptr.dtype != torch.int64:
        raise TypeError(f"indptr: expected int64, got {indptr.dtype}")
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"indices: expected int32 or int64, got {indices.dtype}")
    if values.dtype not in VALUE_DTYPES:
        raise TypeError(f"values: expected float32, float16 or bfloat16, got {values.dtype}")
    for name, t in (("indptr", indptr), ("indices", indices), ("values", values)):
        if t.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(t.shape)}")
    if not indptr.device == indices.device == values.device:
        raise ValueError(f"indptr, indices and values must be on one device, got {indptr.device}, "
                         f"{indices.device}, {values.device}")
    if indptr.numel() < 1:
        raise ValueError("indptr: must hold at least one entry (rows + 1)")
    if indices.numel() != values.numel():
        raise ValueError(f"indices and values have mismatched lengths {indices.numel()} and {values.numel()}")
    if indices.dtype == torch.int32 and dim > 2**31 - 1:
        raise ValueError(f"indices: int32 cannot hold columns of dim {dim}")
    # One device-to-host transfer for all the scalar facts.
    facts = [indptr[0], indptr[-1], (indptr[1:] < indptr[:-1]).any()]
    if indices.numel():
        facts += [indices.min(), indices.max()]
    first, last, decreasing, *bounds = torch.stack([f.to(torch.int64) for f in facts]).tolist()
    if first != 0:
        raise ValueError(f"indptr: must start at 0, starts at {first}")
    if last != indices.numel():
        raise ValueError(f"indptr: ends at {last} but there are {indices.numel()} indices")
    if decreasing:
        raise ValueError("indptr: row pointers must be non-decreasing")
    if bounds:
        lo, hi = bounds
        if lo < 0:
            raise ValueError(f"indices: negative column index {lo}")
        if hi >= dim:
            raise ValueError(f"indices: column index {hi} out of range for dim {dim}")


def _row_starts(indptr: torch.Tensor, nnz: int) -> torch.Tensor:
    """Boolean mask over non-zeros marking the first entry of each row (no host sync: an empty row's pointer is
    the next row's start, or lands in the spare last slot)."""
    start = torch.zeros(nnz + 1, dtype=torch.bool, device=indptr.device)
    start[indptr[:-1]] = True
    return start[:nnz]


def cast_values(values: torch.Tensor, dtype: torch.dtype | None, name: str) -> torch.Tensor:
    """``values`` as ``dtype``; raises ValueError where a finite value does not fit (float16 tops out at 65504)."""
    if dtype is None or values.dtype == dtype:
        return values
    out = values.to(dtype)
    if dtype.is_floating_point and values.is_floating_point() and out.numel():
        lost = torch.isfinite(values) & ~torch.isfinite(out)
        if bool(lost.any()):
            bad = float(values[lost.nonzero()[0]].item())
            raise ValueError(f"{name}: {bad:g} overflows {dtype} (largest finite {torch.finfo(dtype).max:g}); keep "
                             f"a wider dtype or scale the weights")
    return out


def as_long(x: torch.Tensor) -> torch.Tensor:
    """int64 values of an index array; int16 arrays (terms, group numbers) hold uint16 bits."""
    return x.long() & 0xFFFF if x.dtype == torch.int16 else x.long()


def offsets_valid(ptr: torch.Tensor, total: int) -> bool:
    """Whether ``ptr`` is offsets of lists into ``total`` entries: it runs from 0 to ``total``, never decreasing."""
    return ptr.numel() >= 1 and int(ptr[0]) == 0 and int(ptr[-1]) == total and not bool((ptr.diff() < 0).any())


def check_lists(ptr: torch.Tensor, entries: torch.Tensor, upper: int, where: str, what: str) -> None:
    """Checks lists stored as offsets into ``entries`` (list i is ``entries[ptr[i]:ptr[i + 1]]``), as the index
    kernels need them: ``ptr`` runs from 0 to ``len(entries)`` and never decreases, entries lie in ``[0, upper)``
    and strictly increase within each list. Raises ValueError naming ``where`` and ``what``."""
    if not offsets_valid(ptr, entries.numel()):
        raise ValueError(f"{where}: {what}: offsets are inconsistent")
    if entries.numel():
        if int(entries.min()) < 0 or int(entries.max()) >= upper:
            raise ValueError(f"{where}: {what}: entries out of range [0, {upper})")
        if bool(((entries[1:] <= entries[:-1]) & ~_row_starts(ptr, entries.numel())[1:]).any()):
            raise ValueError(f"{where}: {what}: entries not strictly ascending within a list")


def _check_sorted(indptr: torch.Tensor, indices: torch.Tensor) -> None:
    if indices.numel() < 2:
        return
    bad = (indices[1:] <= indices[:-1]) & ~_row_starts(indptr, indices.numel())[1:]
    if bool(bad.any()):
        pos = int(bad.nonzero()[0]) + 1
        row = int(torch.searchsorted(indptr, torch.tensor(pos, device=indptr.device), right=True)) - 1
        kind = "duplicated" if int(indices[pos]) == int(indices[pos - 1]) else "not sorted"
        raise ValueError(f"indices: column indices {kind} within row {row} (at non-zero {pos}); "
                         "pass sort=True to sort them and sum duplicates")


def _check_values(values: torch.Tensor) -> None:
    if values.numel() and not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).nonzero()[0])
        raise ValueError(f"values: non-finite value {values[bad].item()} at non-zero {bad}")


def _sort_and_merge(indptr, indices, values, dim):
    n = indptr.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n, device=indptr.device), indptr[1:] - indptr[:-1],
                                   output_size=indices.numel())
    cols = indices.long()
    # Stable sorts by column, then by row: one sort on row * dim + column would overflow int64 once rows x dim
    # reaches 2^63.
    order = torch.sort(cols, stable=True).indices
    order = order[torch.sort(rows[order], stable=True).indices]
    rows, cols = rows[order], cols[order]
    first = torch.ones(rows.numel(), dtype=torch.bool, device=rows.device)
    first[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
    merged = torch.zeros(int(first.sum()), dtype=torch.float32, device=values.device)
    merged.index_add_(0, torch.cumsum(first, 0) - 1, values[order].float())
    return _indptr_from_sorted_rows(rows[first], n), cols[first].to(indices.dtype), merged.to(values.dtype)


def _indptr_from_sorted_rows(rows: torch.Tensor, n: int) -> torch.Tensor:
    """CSR row pointers from the non-decreasing row number of each non-zero (no host sync, unlike bincount)."""
    return torch.searchsorted(rows, torch.arange(n + 1, device=rows.device, dtype=rows.dtype))
