"""Pure-torch definitions of every kernel in this library: the meaning of "correct" for tests and benchmarks.

Written for clarity, not speed. Conventions shared by all kernels:

* **Ties** go to the lower index: among equal values top-k prefers the lower position, search prefers the lower
  document id, nearest-centroid encoding prefers the lower code.
* **NaN** is larger than every number (as in ``torch.topk`` / ``torch.sort``).
* **Precision**: products and sums accumulate in float32 whatever the input dtype (float32/float16/bfloat16);
  scores and attention outputs are returned in float32. Kernels may sum in another order, so they match these
  definitions to float32 rounding, not bit for bit.
"""
from __future__ import annotations

import heapq
import math

import numpy as np
import torch

from .sparse import SparseBatch, as_long

# ---- sparse x sparse ---------------------------------------------------------------------------------------------


def _check_pair(a: SparseBatch, b: SparseBatch) -> None:
    if a.dim != b.dim:
        raise ValueError(f"dims differ: {a.dim} vs {b.dim}")


def sparse_dot(q: SparseBatch, d: SparseBatch) -> torch.Tensor:
    """All pairs: ``out[i, j] = sum_t q[i, t] * d[j, t]``, float32 of shape (len(q), len(d))."""
    _check_pair(q, d)
    return q.to_dense(torch.float32) @ d.to_dense(torch.float32).T


def pairwise_sparse_dot(a: SparseBatch, b: SparseBatch) -> torch.Tensor:
    """Row with row: ``out[i] = sum_t a[i, t] * b[i, t]``, float32 of shape (len(a),)."""
    _check_pair(a, b)
    if len(a) != len(b):
        raise ValueError(f"row counts differ: {len(a)} vs {len(b)}")
    return (a.to_dense(torch.float32) * b.to_dense(torch.float32)).sum(1)


def sparse_search(queries: SparseBatch, docs: SparseBatch, k: int,
                  allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k documents by dot product: (scores float32 (nq, k), ids int64 (nq, k)).

    Scores descending, ties to the lower document id. With fewer than k documents the tail is padded with
    score -inf and id -1. Documents sharing no dimension with the query score 0 and are ranked like any other.
    With ``allowed`` (bool, one per document) only the allowed documents are candidates.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    scores = sparse_dot(queries, docs)
    ids = torch.arange(len(docs))
    if allowed is not None:
        ids = ids[allowed.bool()]
        scores = scores[:, ids]
    kk = min(k, ids.numel())
    top_scores, top_ids = topk(scores, kk, dim=1)
    top_ids = ids[top_ids]
    pad = k - kk
    if pad:
        top_scores = torch.cat([top_scores, top_scores.new_full((len(queries), pad), -math.inf)], 1)
        top_ids = torch.cat([top_ids, top_ids.new_full((len(queries), pad), -1)], 1)
    return top_scores, top_ids


def list_search(bm, queries: SparseBatch, k: int, alpha: float, query_cut: int):
    """Term-list search (``term_lists.py``; the raw op ``block_search`` with ``lists``) of each query, step for step
    as the kernel takes them and in float32 as it rounds, so that tests can require the same results at any
    setting: (scores (nq, k), ids (nq, k), complete (nq,), groups scored (nq,)). ``bm``: a block-max structure with
    term lists; queries with sorted, unique terms, finite weights and at most 255 terms (the others are exhaustive
    search's). Rows not ``complete`` (fewer than k scored or a k-th score <= 0) hold what was found.

    The query's positive terms, cut to the ``query_cut`` (0: all) of largest weight x scale (ties to the lower
    position), choose lists; each list's groups get summary scores (for each positive query term in order, weight x
    scale x each 8-bit entry added to its group); groups of positive score are taken largest score first (ties to
    the lower group number), in batches of up to 8 that pass the stopping test (k scored and the k-th score above
    alpha x the group's score x a rounding margin) before the batch is scored; each batch's documents are scored
    exactly, each document once."""
    f32 = np.float32
    L = bm.lists
    scale = bm.scale.numpy()
    fwd_ptr, fwd_terms, fwd_w = bm.fwd_ptr.numpy(), as_long(bm.fwd_terms).numpy(), bm.fwd_weights.float().numpy()
    doc_ids = bm.doc_ids.numpy()
    list_ptr, group_ptr, group_docs = L.list_ptr.numpy(), L.group_ptr.numpy(), L.group_docs.numpy()
    dir_ptr, dir_terms, dir_at = L.dir_ptr.numpy(), as_long(L.dir_terms).numpy(), L.dir_at.numpy()
    ent_ptr, ent_steps, ent_values = L.ent_ptr.numpy(), L.ent_steps.numpy(), L.ent_values.numpy()
    one_ptr, one_terms = L.one_ptr.numpy(), as_long(L.one_terms).numpy()
    one_groups, one_values = as_long(L.one_groups).numpy(), L.one_values.numpy()
    nq = len(queries)
    out_scores = torch.full((nq, k), -math.inf)
    out_ids = torch.full((nq, k), -1, dtype=torch.int64)
    complete = torch.zeros(nq, dtype=torch.bool)
    visited = torch.zeros(nq, dtype=torch.int64)
    for qi in range(nq):
        a, b = int(queries.indptr[qi]), int(queries.indptr[qi + 1])
        terms, weights = queries.indices[a:b].tolist(), queries.values[a:b].float().numpy()
        qw = dict(zip(terms, weights))
        positive = [r for r in range(len(terms)) if weights[r] > 0]
        if 0 < query_cut < len(positive):
            positive = sorted(sorted(positive, key=lambda r: (-(weights[r] * scale[terms[r]]), r))[:query_cut])
        cand = []
        for r in positive:
            t = terms[r]
            g0, ng = list_ptr[t], list_ptr[t + 1] - list_ptr[t]
            acc = np.zeros(ng, dtype=f32)
            d0, d1, e0, e1 = dir_ptr[t], dir_ptr[t + 1], ent_ptr[t], ent_ptr[t + 1]
            dterms = {u: j for j, u in enumerate(dir_terms[d0:d1].tolist(), d0)}
            oterms = {u: o for o, u in enumerate(one_terms[one_ptr[t]:one_ptr[t + 1]].tolist(), one_ptr[t])}
            for u, wu in zip(terms, weights):
                if not wu > 0:
                    continue
                w = f32(wu) * f32(scale[u])
                if u in dterms:
                    j = dterms[u]
                    lo, hi = e0 + dir_at[j], (e0 + dir_at[j + 1] if j + 1 < d1 else e1)
                    g = 0
                    for e in range(lo, hi):
                        g += int(ent_steps[e])
                        acc[g] = acc[g] + w * f32(ent_values[e])
                elif u in oterms:
                    o = oterms[u]
                    acc[one_groups[o]] = acc[one_groups[o]] + w * f32(one_values[o])
            cand += [(float(acc[g]), int(g0 + g)) for g in range(ng) if acc[g] > 0]
        cand.sort(key=lambda c: (-c[0], c[1]))
        margin = f32(1) + f32(len(terms) + 4) * f32(2.4e-7)
        scored, seen, pos = [], set(), 0
        top = []  # the k largest scores so far, a min-heap: top[0] is the k-th
        more = True
        while more:
            batch = []
            while len(batch) < 8:
                if pos == len(cand) or (len(top) == k and top[0] > f32(alpha) * f32(cand[pos][0]) * margin):
                    more = False
                    break
                batch.append(cand[pos][1])
                pos += 1
            for g in batch:
                for d in group_docs[group_ptr[g]:group_ptr[g + 1]].tolist():
                    if d in seen:
                        continue
                    seen.add(d)
                    s = f32(0)
                    for p in range(fwd_ptr[d], fwd_ptr[d + 1]):
                        s = s + f32(qw.get(int(fwd_terms[p]), 0)) * f32(fwd_w[p])
                    scored.append((s, int(doc_ids[d])))
                    if len(top) < k:
                        heapq.heappush(top, s)
                    elif s > top[0]:
                        heapq.heapreplace(top, s)
            visited[qi] += len(batch)
        best = sorted(scored, key=lambda s: (-s[0], s[1]))[:k]
        out_scores[qi, :len(best)] = torch.tensor([s for s, _ in best], dtype=torch.float32)
        out_ids[qi, :len(best)] = torch.tensor([i for _, i in best], dtype=torch.int64)
        complete[qi] = bool(len(best) == k and best[-1][0] > 0)
    return out_scores, out_ids, complete, visited


# ---- top-k -------------------------------------------------------------------------------------------------------


def topk(x: torch.Tensor, k: int, dim: int = -1, largest: bool = True,
         sorted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest (or smallest) entries along ``dim``: (values, int64 indices).

    Values come out ordered (descending for largest, ascending otherwise), equal values by increasing index, NaN
    ranked above +inf. ``sorted=False`` allows any order of the same selection; this definition always sorts.
    """
    n = x.shape[dim] if x.dim() else 1
    if not 0 <= k <= n:
        raise ValueError(f"k must lie in [0, {n}], got {k}")
    if x.dim() == 0:  # a row of one; k=1 keeps the 0-dim shape as torch.topk does, k=0 gives shape (0,)
        values, indices = topk(x.reshape(1), k, 0, largest)
        return (values.reshape(()), indices.reshape(())) if k == 1 else (values, indices)
    # A stable sort keeps equal values in index order; torch.sort on the CPU ranks every NaN above every number
    # (the CUDA sort ranks a NaN with its sign bit set below -inf, so the definition sorts on the CPU).
    values, indices = torch.sort(x.cpu(), dim=dim, descending=largest, stable=True)
    return values.narrow(dim, 0, k).to(x.device), indices.narrow(dim, 0, k).to(x.device)


def topk_sparsify(x: torch.Tensor, k: int, by: str = "value") -> torch.Tensor:
    """Keeps the k largest entries of each row (last dimension) of ``x``, by ``value`` or by ``abs``, zeroing the
    rest. Differentiable: the gradient reaches the kept entries only. Ties to the lower index."""
    if by not in ("value", "abs"):
        raise ValueError(f"by must be 'value' or 'abs', got {by!r}")
    k = min(k, x.shape[-1])
    score = x.detach().abs() if by == "abs" else x.detach()
    _, idx = topk(score, k, dim=-1)
    mask = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)
    return x.masked_fill(~mask, 0)  # not x * mask: -inf * 0 would be NaN


# ---- k-means and coupled quantization -------------------------------------------------------------------------


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (squared Euclidean distance, float32) for each row of x; ties to the lower
    index. x: (n, c), centroids: (K, c) -> int64 (n,)."""
    dist = (x.float()[:, None, :] - centroids.float()[None, :, :]).pow(2).sum(-1)
    return dist.argmin(1)  # argmin returns the first minimum


def kmeans_init(x: torch.Tensor, n_clusters: int, weights: torch.Tensor | None = None, init: str = "k-means++",
                seed: int = 0) -> torch.Tensor:
    """Seeds for ``kmeans``: float32 (n_clusters, c) on the CPU.

    ``init="k-means++"`` samples seeds with probability proportional to weight x squared distance to the chosen
    seeds (inverse CDF of one uniform draw per seed); ``"random"`` takes distinct random rows. With fewer rows than
    clusters the missing seeds repeat the last.
    """
    xc = x.float().cpu()
    n = xc.shape[0]
    if n == 0:
        raise ValueError("kmeans needs at least one row")
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    w = torch.ones(n) if weights is None else weights.float().reshape(n).cpu()
    gen = torch.Generator().manual_seed(seed)
    if init == "random":
        seeds = torch.randperm(n, generator=gen)[:n_clusters]
    elif init == "k-means++":
        def draw(p):
            cdf = torch.cumsum(p, 0)
            return min(int(torch.searchsorted(cdf, torch.rand(1, generator=gen) * cdf[-1], right=True)), n - 1)

        first = draw(w if w.sum() > 0 else torch.ones(n))
        seeds = [first]
        d2 = (xc - xc[first]).pow(2).sum(1)
        for _ in range(1, min(n_clusters, n)):
            p = d2 * w
            if float(p.sum()) <= 0:
                break
            nxt = draw(p)
            seeds.append(nxt)
            d2 = torch.minimum(d2, (xc - xc[nxt]).pow(2).sum(1))
        seeds = torch.tensor(seeds)
    else:
        raise ValueError(f"init must be 'k-means++' or 'random', got {init!r}")
    centroids = xc[seeds]
    if centroids.shape[0] < n_clusters:
        centroids = torch.cat([centroids, centroids[-1:].expand(n_clusters - centroids.shape[0], -1)])
    return centroids


def kmeans(x: torch.Tensor, n_clusters: int, iters: int = 20, weights: torch.Tensor | None = None,
           init: str = "k-means++", seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means with optional per-row weights from ``kmeans_init`` seeds; returns float32 centroids
    (n_clusters, c). A cluster that loses all its points keeps its centroid."""
    centroids = kmeans_init(x, n_clusters, weights, init, seed)
    xc = x.float().cpu()
    n = xc.shape[0]
    w = torch.ones(n) if weights is None else weights.float().reshape(n).cpu()
    for _ in range(iters):
        assign = nearest_centroid(xc, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, xc * w[:, None])
        mass = torch.zeros(n_clusters).index_add_(0, assign, w)
        moved = mass > 0
        centroids[moved] = sums[moved] / mass[moved, None]
    return centroids.to(x.device)


def cq_code_dtype(n_centroids: int) -> torch.dtype:
    """uint8 codes for up to 256 centroids per group, int16 above (bits <= 15)."""
    return torch.uint8 if n_centroids <= 256 else torch.int16


def cq_encode(x: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Coupled-quantization encode. x: (..., channels); codebooks: (groups, K, g) with channels = groups * g.
    Returns codes (..., groups) of ``cq_code_dtype(K)``: per group, the nearest centroid, ties to the lower code."""
    groups, n_centroids, g = codebooks.shape
    if x.shape[-1] != groups * g:
        raise ValueError(f"x has {x.shape[-1]} channels, codebooks cover {groups} x {g}")
    xs = x.reshape(-1, groups, g)
    codes = torch.stack([nearest_centroid(xs[:, j], codebooks[j]) for j in range(groups)], 1)
    return codes.reshape(*x.shape[:-1], groups).to(cq_code_dtype(n_centroids))


def cq_decode(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Inverse of ``cq_encode``: codes (..., groups) -> (..., groups * g) in the codebooks' dtype."""
    groups, _, g = codebooks.shape
    flat = codes.reshape(-1, groups).long()
    out = torch.stack([codebooks[j][flat[:, j]] for j in range(groups)], 1)
    return out.reshape(*codes.shape[:-1], groups * g)


def cq_attention(q: torch.Tensor, k_codes: torch.Tensor, v_codes: torch.Tensor, k_codebooks: torch.Tensor,
                 v_codebooks: torch.Tensor, k_recent: torch.Tensor | None = None,
                 v_recent: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                 scale: float | None = None, starts: torch.Tensor | None = None) -> torch.Tensor:
    """Decode-step attention over a coupled-quantized history plus a full-precision window of recent tokens.

    Shapes (B batch, Hq query heads, Hkv key/value heads dividing Hq, D head dim, G = D / g groups per head):
      q (B, Hq, Tq, D); k_codes, v_codes (B, Hkv, T, G); k_codebooks, v_codebooks (Hkv * G, K, g), i.e. the
      quantizer over the Hkv * D channels of a token, heads outermost; k_recent, v_recent (B, Hkv, W, D);
      lengths (B,) int: how many of the T coded tokens of each sequence are real (the rest is padding);
      starts (B, Tq) int: query t of sequence b sees no position of [coded, recent] below starts[b, t] (left
      padding, a sliding window).
    The sequence is [coded tokens, recent tokens]; the Tq queries are its last Tq tokens, so query t sees every
    coded token and the recent tokens up to its own position (causal among themselves), from its start on. Query head h reads
    key/value head h // (Hq / Hkv). Returns float32 (B, Hq, Tq, D) = softmax(q K^T * scale) V with K, V decoded;
    a query that sees no token at all (length 0 and no window) gets zeros.
    Keys are compared as given: codes of post-RoPE keys with post-RoPE queries (or both pre-RoPE, without RoPE).
    """
    B, Hq, Tq, D = q.shape
    Hkv, T = k_codes.shape[1], k_codes.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} not a multiple of key/value heads {Hkv}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale

    def dequant(codes, books):
        tokens = codes.permute(0, 2, 1, 3).reshape(B, T, Hkv * codes.shape[3])
        return cq_decode(tokens, books).float().reshape(B, T, Hkv, D).permute(0, 2, 1, 3)

    keys, vals = dequant(k_codes, k_codebooks), dequant(v_codes, v_codebooks)
    W = 0
    if k_recent is not None:
        W = k_recent.shape[2]
        keys = torch.cat([keys, k_recent.float()], 2)
        vals = torch.cat([vals, v_recent.float()], 2)
    rep = Hq // Hkv
    keys, vals = keys.repeat_interleave(rep, 1), vals.repeat_interleave(rep, 1)
    scores = (q.float() @ keys.transpose(-1, -2)) * scale  # (B, Hq, Tq, T + W)
    lengths = torch.full((B,), T) if lengths is None else lengths.cpu()
    pos = torch.arange(T + W)
    coded_ok = (pos[None, :] < lengths[:, None]) | (pos[None, :] >= T)  # (B, T + W)
    # Query t sits at window position W - Tq + t; it may not see later window positions.
    qpos = T + W - Tq + torch.arange(Tq)
    causal = pos[None, :] <= qpos[:, None]  # (Tq, T + W)
    allowed = coded_ok[:, None, None, :] & causal[None, None, :, :]
    if starts is not None:
        allowed = allowed & (pos[None, None, None, :] >= starts.cpu()[:, None, :, None])
    allowed = allowed.to(scores.device)
    probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), -1)
    probs = torch.where(allowed.any(-1, keepdim=True), probs, 0.0)
    return probs @ vals
