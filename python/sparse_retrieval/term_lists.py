"""Term lists: the structure of `SparseIndex`'s approximate search at scale, after Seismic (Bruch, Nardini, Rulli,
Venturini, SIGIR 2024), built on the forward index of the block-max structure (`block_search.py`).

Each term keeps its ``list_len`` documents of largest weight, clustered into groups of about ``group`` similar
documents (Seismic's clustering: centroids spread over the list, each document joins the one it shares the most
weight with over their ``doc_cut`` heaviest terms; clusters larger than ``group`` are cut into runs). Each group
keeps a summary: the largest weight of every term over its documents, cut to the heaviest terms that carry
``summary_energy`` of their sum, 8 bits each; a list's summaries are stored transposed (term, then group), so a
query reads only the entries of its own terms. A search takes the groups listed under the query's ``query_cut``
terms of largest weight x maximum, scores each group by the dot product of the query with its summary, then scores
the groups' documents from the forward index best group first (each document once), and stops once the k-th score
beats ``alpha`` times the best summary score left. Summaries miss terms, so ``alpha`` above 1 (scoring further)
buys recall; recall grows with alpha (the groups scored are a prefix of one order). Where block-max search bounds
every block, a cost that grows with the collection, this reads a few short lists: on 2M documents 2.1-2.4x the QPS
of Seismic's best setting at recall 0.95, 0.97 and 0.99 (1.9x in one run), 1 thread; at 8.8M, recall 0.979 at
0.32 ms p50 per query with lists of 6,500 documents (docs/benchmarks.md). Lists must grow with the collection
(2,000 documents per term stop near recall 0.92 at 8.8M, 4,205 near 0.97; the default, ``list_len="auto"``, grows
them from 2M documents on).

With ``list_len`` covering every posting, ``summary_energy = 1``, every query term and ``alpha = 1`` the results
are exact (summaries are then upper bounds of their documents' scores); the tests use this.

The kernel is csrc/kernels/cpu/list_search.cpp (op ``torch.ops.sparse_retrieval.block_search`` with ``lists``; the
builder op ``term_lists``).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, fields

import torch

from ._fake import fake
from .sparse import as_long, check_lists, offsets_valid

_ops = torch.ops.sparse_retrieval

MAX_LIST_LEN = 65536  # groups are numbered within a list in 16 bits
DEFAULT_QUERY_CUT = 8
DEFAULT_ALPHA = 1.1
MAX_ALPHA = 16.0


@dataclass
class TermLists:
    """Term t's groups: ``list_ptr[t]:list_ptr[t + 1]``; group g's documents (stored positions of the block-max
    structure, ascending): ``group_docs[group_ptr[g]:group_ptr[g + 1]]``. Summaries, transposed per list: list t's
    distinct summary terms ``dir_terms[dir_ptr[t]:dir_ptr[t + 1]]``; directory entry j's entries
    ``ent_ptr[t] + dir_at[j]`` up to the next one's (the list's last up to ``ent_ptr[t + 1]``), each a group of the
    list and the term's 8-bit maximum over it (``ent_values``, in units of the block-max structure's ``scale``).
    A run's groups ascend and are stored as steps (``ent_steps``: the group's number in the list is the sum of the
    run's steps up to it); a step above 255 is split by filler entries (step 255, value 0). Two bytes an entry
    where a 16-bit group number took three (the entries are most of the lists). A term in the summary of one group
    of the list only (70% of the directory's terms on real data) has no directory entry: list t's such terms
    ``one_terms[one_ptr[t]:one_ptr[t + 1]]`` (ascending), each with its group's number (``one_groups``, read as
    uint16) and maximum (``one_values``)."""
    list_len: int
    group: int
    summary_energy: float
    doc_cut: int
    list_ptr: torch.Tensor    # int64 (dim + 1,)
    group_ptr: torch.Tensor   # int64 (groups + 1,)
    group_docs: torch.Tensor  # int32
    dir_ptr: torch.Tensor     # int64 (dim + 1,)
    dir_terms: torch.Tensor   # the forward index's term dtype
    dir_at: torch.Tensor      # int32, one per directory entry
    ent_ptr: torch.Tensor     # int64 (dim + 1,)
    ent_steps: torch.Tensor   # uint8
    ent_values: torch.Tensor  # uint8
    one_ptr: torch.Tensor     # int64 (dim + 1,)
    one_terms: torch.Tensor   # the forward index's term dtype
    one_groups: torch.Tensor  # int16 (uint16 bits)
    one_values: torch.Tensor  # uint8

    def tensors(self) -> list[torch.Tensor]:
        """The tensors, in the order the op takes them."""
        return [getattr(self, f.name) for f in fields(self) if f.name not in _PARAMS]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def meta(self) -> torch.Tensor:
        """The parameters as saved: list_len, group, summary_energy (parts per 10^6), doc_cut."""
        return torch.tensor([self.list_len, self.group, round(self.summary_energy * 1e6), self.doc_cut])


_PARAMS = ("list_len", "group", "summary_energy", "doc_cut")
_SINGLES = ("one_ptr", "one_terms", "one_groups", "one_values")
FIELDS = tuple(f.name for f in fields(TermLists) if f.name not in _PARAMS)


def check_params(list_len: int | str, group: int, summary_energy: float, doc_cut: int) -> None:
    for name, value, high in (("list_len", list_len, MAX_LIST_LEN), ("group", group, 1 << 20),
                              ("doc_cut", doc_cut, 1 << 20)):
        if name == "list_len" and value == "auto":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise ValueError(f"{name}: expected an int in [1, {high}], got {value!r}")
    if isinstance(summary_energy, bool) or not isinstance(summary_energy, (int, float)) or \
            not 0 < summary_energy <= 1:
        raise ValueError(f"summary_energy: expected a number in (0, 1], got {summary_energy!r}")


def auto_list_len(ndocs: int) -> int:
    """Documents per term list for a collection of ``ndocs``: 2,000 up to 2M documents (recall 0.98 at the default
    search settings on 2M), growing with ``ndocs ** 0.8`` beyond: 6,567 at 8.8M, where 6,500 gave recall 0.979 at the
    default search settings and 0.99 within reach (query_cut 12, alpha 1.2), at a little more QPS than 4,205 (the
    square-root rule's) did at 0.958; 2,000 stopped near 0.92 (docs/benchmarks.md)."""
    return min(MAX_LIST_LEN, max(2000, round(2000 * (ndocs / 2e6) ** 0.8)))


def build_term_lists(bm, *, list_len: int | str = "auto", group: int = 8, summary_energy: float = 0.7,
                     doc_cut: int = 15) -> TermLists:
    """The term lists of a block-max structure ``bm`` (see the module docstring for the parameters; the defaults
    are the best measured on 2M documents; ``list_len="auto"``: `auto_list_len`)."""
    if list_len == "auto":
        list_len = auto_list_len(bm.ndocs)
    check_params(list_len, group, summary_energy, doc_cut)
    arrays = _ops.term_lists(bm.fwd_ptr, bm.fwd_terms, bm.fwd_weights, bm.scale, list_len, group,
                             float(summary_energy), doc_cut)
    return TermLists(list_len, group, float(summary_energy), doc_cut, *arrays)


def check_spec(spec: dict) -> None:
    """Checks keyword arguments of build_term_lists (names and values) before the long build that precedes it."""
    params = {n: p.default for n, p in inspect.signature(build_term_lists).parameters.items() if n != "bm"}
    unknown = set(spec) - set(params)
    if unknown:
        raise ValueError(f"term_lists: unknown parameters {sorted(unknown)} ({', '.join(params)})")
    check_params(**{**params, **spec})


def from_saved(meta: torch.Tensor, arrays: dict[str, torch.Tensor], where: str) -> TermLists:
    """TermLists from a file's arrays, parameters checked (the contents are checked by `validate_term_lists`).
    Files before version 6 hold 16-bit group numbers (``ent_groups``), converted to steps; files written before the
    single entries were kept apart have every term in the directory: they load with no single entries."""
    if "ent_groups" in arrays and "ent_steps" not in arrays:
        arrays = dict(arrays)
        arrays["ent_ptr"], arrays["dir_at"], arrays["ent_steps"], arrays["ent_values"] = _stepped(
            arrays["dir_ptr"], arrays["dir_at"], arrays["ent_ptr"], arrays.pop("ent_groups"), arrays["ent_values"],
            where)
    if meta.numel() == 4 and set(arrays) == set(FIELDS) - set(_SINGLES):
        arrays = dict(arrays, one_ptr=torch.zeros_like(arrays["list_ptr"]), one_terms=arrays["dir_terms"][:0],
                      one_groups=torch.zeros(0, dtype=torch.int16), one_values=arrays["ent_values"][:0])
    if meta.numel() != 4 or set(arrays) != set(FIELDS):
        raise ValueError(f"{where}: term lists: unexpected arrays {sorted(arrays)}")
    list_len, group, energy, doc_cut = meta.tolist()
    check_params(list_len, group, energy / 1e6, doc_cut)
    return TermLists(list_len, group, energy / 1e6, doc_cut, **arrays)


# Entries converted at once from a file before version 6: the int64 temporaries (about 100 bytes an entry) stay
# near 400 MB whatever the file's size (an 8.8M-document index has over a billion entries).
_CONVERT_ENTRIES = 1 << 22


def _stepped(dir_ptr, dir_at, ent_ptr, ent_groups, ent_values, where):
    """(ent_ptr, dir_at, ent_steps, ent_values) of entries given as 16-bit group numbers (files before version 6):
    each entry's step from the previous one of its run (from 0 at the run's start), fillers where a step exceeds
    255; converted a run of terms at a time. Other damage (directory offsets out of range) is left to
    `validate_term_lists`."""
    n = ent_groups.numel()
    if any(t.dim() != 1 for t in (dir_ptr, dir_at, ent_ptr, ent_groups, ent_values)) or dir_ptr.dtype != torch.int64 \
            or ent_ptr.dtype != torch.int64 or dir_at.dtype != torch.int32 or ent_groups.dtype != torch.int16 or \
            ent_values.numel() != n or dir_ptr.numel() != ent_ptr.numel() or \
            not offsets_valid(dir_ptr, dir_at.numel()) or not offsets_valid(ent_ptr, n):
        raise ValueError(f"{where}: term lists: arrays are inconsistent")
    dim = dir_ptr.numel() - 1
    none = torch.zeros(0, dtype=torch.uint8)
    ptrs, ats, steps, values = [ent_ptr.new_zeros(1)], [dir_at[:0]], [none], [none]
    t0 = 0
    while t0 < dim:
        t1 = int(torch.searchsorted(ent_ptr, ent_ptr[t0] + _CONVERT_ENTRIES))
        t1 = min(max(t1, t0 + 1), dim)
        e0, e1, d0, d1 = int(ent_ptr[t0]), int(ent_ptr[t1]), int(dir_ptr[t0]), int(dir_ptr[t1])
        ptr, at, st, va = _stepped_run(dir_ptr[t0:t1 + 1] - d0, dir_at[d0:d1], ent_ptr[t0:t1 + 1] - e0,
                                       ent_groups[e0:e1], ent_values[e0:e1])
        ptrs.append(ptr[1:] + ptrs[-1][-1])
        ats.append(at)
        steps.append(st)
        values.append(va)
        t0 = t1
    return torch.cat(ptrs), torch.cat(ats), torch.cat(steps), torch.cat(values)


def _stepped_run(dir_ptr, dir_at, ent_ptr, ent_groups, ent_values):
    """_stepped on a run of terms (offsets from 0)."""
    n = ent_groups.numel()
    if n == 0:
        return ent_ptr, dir_at, torch.zeros(0, dtype=torch.uint8), ent_values
    groups = as_long(ent_groups)
    owner = torch.repeat_interleave(torch.arange(dir_ptr.numel() - 1), dir_ptr[1:] - dir_ptr[:-1])
    starts = (ent_ptr[owner] + dir_at.long()).clamp(0, n - 1)
    previous = torch.cat([groups.new_zeros(1), groups[:-1]])
    previous[starts] = 0
    step = (groups - previous).clamp(min=0)
    fill = torch.where(step > 255, (step - 1) // 255, 0)
    end = torch.cumsum(fill + 1, 0)
    first = end - fill - 1  # where the entry's fillers (or the entry) begin
    steps = torch.full((int(end[-1]),), 255, dtype=torch.uint8)
    values = torch.zeros(int(end[-1]), dtype=torch.uint8)
    steps[end - 1] = (step - 255 * fill).to(torch.uint8)
    values[end - 1] = ent_values
    new_ptr = torch.cat([first, end[-1:]])[ent_ptr]
    new_at = (first[starts] - new_ptr[owner]).to(torch.int32)
    return new_ptr, new_at, steps, values


def validate_term_lists(tl: TermLists, bm, where: str) -> None:
    """The invariants the kernel relies on, checked after loading (it also checks them itself once per tensor)."""
    dim, ndocs = bm.scale.numel(), bm.ndocs
    ngroups = tl.group_ptr.numel() - 1
    dtypes = (torch.int64, torch.int64, torch.int32, torch.int64, bm.fwd_terms.dtype, torch.int32, torch.int64,
              torch.uint8, torch.uint8, torch.int64, bm.fwd_terms.dtype, torch.int16, torch.uint8)
    if any(t.dtype != d or t.dim() != 1 for t, d in zip(tl.tensors(), dtypes)) or ngroups < 0 or \
            any(p.numel() != dim + 1 for p in (tl.list_ptr, tl.dir_ptr, tl.ent_ptr, tl.one_ptr)) or \
            tl.dir_at.numel() != tl.dir_terms.numel() or tl.ent_values.numel() != tl.ent_steps.numel() or \
            not tl.one_terms.numel() == tl.one_groups.numel() == tl.one_values.numel():
        raise ValueError(f"{where}: term lists: arrays are inconsistent")
    for ptr, total, name in ((tl.list_ptr, ngroups, "list_ptr"), (tl.ent_ptr, tl.ent_steps.numel(), "ent_ptr")):
        if not offsets_valid(ptr, total):
            raise ValueError(f"{where}: term lists: {name} offsets are invalid")
    if dim and int((tl.list_ptr[1:] - tl.list_ptr[:-1]).max()) > MAX_LIST_LEN:
        raise ValueError(f"{where}: term lists: a term lists more than {MAX_LIST_LEN} groups")
    check_lists(tl.group_ptr, tl.group_docs.long(), ndocs, where, "term lists (documents of each group)")
    for ptr, terms, what in ((tl.dir_ptr, tl.dir_terms, "summary terms"), (tl.one_ptr, tl.one_terms, "single terms")):
        check_lists(ptr, as_long(terms), dim, where, f"term lists ({what} of each list)")


@fake("term_lists")
def _(fwd_ptr, fwd_terms, fwd_weights, scale, list_len, group, summary_energy, doc_cut):
    ctx = torch.library.get_ctx()
    listed, ndir, nent, nsingle = (ctx.new_dynamic_size() for _ in range(4))
    group_offsets = ctx.new_dynamic_size(min=1)  # groups + 1 (an unbacked size must appear as itself)
    dim = scale.shape[0]
    return [fwd_ptr.new_empty((dim + 1,)), fwd_ptr.new_empty((group_offsets,)),
            fwd_ptr.new_empty((listed,), dtype=torch.int32), fwd_ptr.new_empty((dim + 1,)),
            fwd_terms.new_empty((ndir,)), fwd_ptr.new_empty((ndir,), dtype=torch.int32),
            fwd_ptr.new_empty((dim + 1,)), fwd_ptr.new_empty((nent,), dtype=torch.uint8),
            fwd_ptr.new_empty((nent,), dtype=torch.uint8), fwd_ptr.new_empty((dim + 1,)),
            fwd_terms.new_empty((nsingle,)), fwd_ptr.new_empty((nsingle,), dtype=torch.int16),
            fwd_ptr.new_empty((nsingle,), dtype=torch.uint8)]
