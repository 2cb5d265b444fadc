"""User-facing document ids of a `SparseIndex`: non-negative int64 or strings, one per document in insertion order,
unique, with the reverse map that ``delete`` and ``filter`` need. An object never changes once built (``extended``
and ``subset`` return new ones), so an index publishes it together with its segments and a reader's snapshot
stays consistent."""
from __future__ import annotations

import numbers

import numpy as np
import torch


class ExternalIds:
    """``auto``: ints the index assigns itself (positional ids kept through ``compact``), new documents getting
    ``next_id`` on."""

    def __init__(self, kind: str, auto: bool = False, next_id: int = 0):
        if kind not in ("int", "str"):
            raise ValueError(f"kind: expected 'int' or 'str', got {kind!r}")
        self.kind = kind
        self.auto, self.next_id = auto, next_id
        self._ints = torch.zeros(0, dtype=torch.int64)  # kind "int": the ids, in position order
        self._sorted = torch.zeros(0, dtype=torch.int64)  # and sorted, with the position of each
        self._sorted_pos = torch.zeros(0, dtype=torch.int64)
        self._strs: list[str] = []  # kind "str"
        self._where: dict[str, int] = {}

    @staticmethod
    def kind_of(ids) -> str:
        """'str' for a sequence of strings, else 'int'."""
        if isinstance(ids, (list, tuple, np.ndarray)) and len(ids) and isinstance(ids[0], str):
            return "str"
        return "int"

    def __len__(self) -> int:
        return self._ints.numel() if self.kind == "int" else len(self._strs)

    def extended(self, ids, n: int) -> "ExternalIds":
        """A copy with the ids of n new documents appended; raises on a wrong count, type or a repeat."""
        out = ExternalIds(self.kind, self.auto, self.next_id)
        out._ints, out._sorted, out._sorted_pos = self._ints, self._sorted, self._sorted_pos
        out._strs, out._where = list(self._strs), dict(self._where)
        out._append(ids, n)
        return out

    def _append(self, ids, n: int) -> None:
        if self.kind == "str":
            ids = list(ids)
            if len(ids) != n or not all(isinstance(i, str) for i in ids):
                raise ValueError(f"ids: expected {n} strings, one per document")
            fresh = {}
            for p, i in enumerate(ids, start=len(self._strs)):
                if i in self._where or i in fresh:
                    raise ValueError(f"ids: {i!r} is already in the index (ids must be unique)")
                fresh[i] = p
            self._strs.extend(ids)
            self._where.update(fresh)
            return
        new = as_int_ids(ids, "ids")
        if new.numel() != n:
            raise ValueError(f"ids: expected {n} ids, one per document, got {new.numel()}")
        if new.numel() and int(new.min()) < 0:
            raise ValueError(f"ids: must be >= 0 (-1 marks padding in results), got {int(new.min())}")
        merged = torch.cat([self._sorted, new])
        if torch.unique(merged).numel() != merged.numel():
            raise ValueError("ids: every id must be unique (a new id repeats one or one already in the index)")
        positions = torch.cat([self._sorted_pos, torch.arange(len(self), len(self) + n)])
        order = torch.argsort(merged)
        if new.numel():
            self.next_id = max(self.next_id, int(new.max()) + 1)
        self._ints = torch.cat([self._ints, new])
        self._sorted, self._sorted_pos = merged[order], positions[order]

    def positions(self, ids, name: str) -> torch.Tensor:
        """Positions (int64) of the given ids; raises ValueError naming ``name`` for an unknown id."""
        if self.kind == "str":
            ids = [ids] if isinstance(ids, str) else list(ids)
            missing = [i for i in ids if i not in self._where]
            if missing:
                raise ValueError(f"{name}: unknown ids {missing[:5]}")
            return torch.tensor([self._where[i] for i in ids], dtype=torch.int64)
        want = as_int_ids(ids, name)
        at = torch.searchsorted(self._sorted, want).clamp(max=max(self._sorted.numel() - 1, 0))
        found = self._sorted.numel() > 0 and bool((self._sorted[at] == want).all()) if want.numel() else True
        if not found:
            bad = want[self._sorted[at] != want] if self._sorted.numel() else want
            raise ValueError(f"{name}: unknown ids {bad[:5].tolist()}")
        return self._sorted_pos[at] if want.numel() else torch.zeros(0, dtype=torch.int64)

    def subset(self, keep: torch.Tensor) -> "ExternalIds":
        """The ids at positions ``keep`` (ascending), as a new object."""
        out = ExternalIds(self.kind, self.auto, self.next_id)
        out._append(self._ints[keep] if self.kind == "int" else [self._strs[p] for p in keep.tolist()], keep.numel())
        out.next_id = self.next_id
        return out

    def lookup(self, pos: torch.Tensor):
        """The ids at positions ``pos`` (-1: padding): an int64 tensor (padding -1), or for strings a numpy object
        array (padding None)."""
        pos = pos.cpu()
        if self.kind == "int":
            return torch.where(pos >= 0, self._ints[pos.clamp(min=0)], -1)
        out = np.full(tuple(pos.shape), None, dtype=object)
        flat, src = out.reshape(-1), pos.reshape(-1).tolist()
        for j, p in enumerate(src):
            if p >= 0:
                flat[j] = self._strs[p]
        return out

    # ---- files ---------------------------------------------------------------------------------------------------
    def arrays(self) -> dict[str, torch.Tensor]:
        """The arrays saved with the index."""
        if self.kind == "int":
            return {"ids.int": self._ints} if not self.auto else \
                {"ids.int": self._ints, "ids.auto_next": torch.tensor([self.next_id], dtype=torch.int64)}
        blob = [s.encode("utf-8") for s in self._strs]
        offsets = torch.zeros(len(blob) + 1, dtype=torch.int64)
        torch.cumsum(torch.tensor([len(b) for b in blob], dtype=torch.int64), 0, out=offsets[1:])
        data = torch.frombuffer(bytearray(b"".join(blob)), dtype=torch.uint8) if offsets[-1] else \
            torch.zeros(0, dtype=torch.uint8)
        return {"ids.str_offsets": offsets, "ids.str_bytes": data}

    @classmethod
    def from_arrays(cls, arrays: dict[str, torch.Tensor], n: int, where: str) -> "ExternalIds":
        """Ids read back from ``arrays`` (what ``arrays()`` wrote), for an index of n documents."""
        if set(arrays) in ({"ids.int"}, {"ids.int", "ids.auto_next"}):
            out = cls("int", auto="ids.auto_next" in arrays)
            ints = arrays["ids.int"]
            n_ids = ints.numel()
        elif set(arrays) == {"ids.str_offsets", "ids.str_bytes"}:
            out = cls("str")
            offsets, data = arrays["ids.str_offsets"].tolist(), bytes(arrays["ids.str_bytes"].numpy())
            if offsets[0] != 0 or offsets[-1] != len(data) or any(a > b for a, b in zip(offsets, offsets[1:])):
                raise ValueError(f"{where}: string id offsets are inconsistent")
            try:
                strs = [data[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:])]
            except UnicodeDecodeError as exc:
                raise ValueError(f"{where}: string ids are not valid UTF-8") from exc
            n_ids = len(strs)
        else:
            raise ValueError(f"{where}: unexpected id arrays {sorted(arrays)}")
        if n_ids != n:
            raise ValueError(f"{where}: {n_ids} ids for {n} documents")
        try:
            out._append(ints if out.kind == "int" else strs, n)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if out.auto:
            stored = arrays["ids.auto_next"]
            if stored.numel() != 1 or int(stored[0]) < out.next_id:
                raise ValueError(f"{where}: the next automatic id is inconsistent")
            out.next_id = int(stored[0])
        return out


def is_mask(x) -> bool:
    """A bool tensor, array, list or tuple: a mask over documents rather than a list of ids."""
    if isinstance(x, (list, tuple)):
        return len(x) > 0 and all(isinstance(v, (bool, np.bool_)) for v in x)
    return (isinstance(x, torch.Tensor) and x.dtype == torch.bool) or (isinstance(x, np.ndarray) and x.dtype == np.bool_)


def as_mask(x, n: int, name: str) -> torch.Tensor:
    """A bool mask (``is_mask``) over ``n`` documents as a flat CPU tensor, its length checked."""
    mask = torch.as_tensor(x).cpu().reshape(-1)
    if mask.numel() != n:
        raise ValueError(f"{name}: a bool mask needs one entry per document ({n}), got {mask.numel()}")
    return mask


def as_int_ids(ids, name: str, below: int | None = None) -> torch.Tensor:
    """``ids`` (one int, or a sequence / set / range / tensor / array of them) as an int64 tensor; with ``below``,
    checked to lie in [0, below)."""
    t = _as_int_ids(ids, name)
    if below is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) >= below):
        raise ValueError(f"{name}: document ids must lie in [0, {below}), got [{int(t.min())}, {int(t.max())}]")
    return t


def _as_int_ids(ids, name: str) -> torch.Tensor:
    if isinstance(ids, numbers.Integral) and not isinstance(ids, bool):
        ids = [ids]
    if isinstance(ids, (set, frozenset, range)):
        ids = list(ids)
    try:
        t = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(np.asarray(ids))
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name}: expected ids as an int or a list, tuple, set, range, tensor or array of ints, got "
                        f"{type(ids).__name__}") from None
    if t.dim() > 1:
        raise ValueError(f"{name}: expected a 1-D collection of ids, got shape {tuple(t.shape)}")
    t = t.reshape(-1).cpu()
    if t.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name}: expected integer ids (or, where accepted, a bool mask), got {t.dtype}")
    if t.dtype == torch.uint8:  # numpy users' 0/1 masks: read as ids they would silently select ids 0 and 1
        raise TypeError(f"{name}: uint8 is ambiguous (a 0/1 mask or ids?): pass a bool mask or int64 ids")
    return t.long()
