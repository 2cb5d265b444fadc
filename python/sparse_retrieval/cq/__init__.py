"""Coupled quantization (CQ) of KV caches: learned codebooks over groups of channels, encode/decode kernels,
decode-step attention straight from the codes, and a Hugging Face ``transformers`` cache.

A :class:`CoupledQuantizer` splits the ``channels`` of a vector into contiguous groups of ``group_size`` and codes
each group by the index of the nearest of ``2**bits`` centroids of that group: ``bits / group_size`` bits per
channel (CQ-8c8b = 1 bit). For a KV cache the channels are the ``Hkv * D`` key (or value) channels of one token,
heads outermost, so per-head codes are ``(B, Hkv, T, D / group_size)``.

Keys: :func:`attention` computes ``q . k`` through a table of ``q_group . centroid``, which is exact only when the
codebooks were fitted on keys in the same frame as the queries. :class:`CoupledQuantizedCache` therefore codes
**post-RoPE** keys (what transformers hands to a cache); ``rope="pre"`` codes pre-RoPE keys instead (as in the
paper) and re-applies RoPE after decoding, at the cost of dequantizing the history for each step.

The transformers pieces (:class:`CoupledQuantizedCache`, :func:`calibrate`) import transformers lazily;
:func:`save_quantizers` / :func:`load_quantizers` keep a model's quantizers in one safetensors file.
"""
from __future__ import annotations

import math
import numbers

import torch

from .. import reference
from .._fake import fake

__all__ = ["CoupledQuantizer", "attention", "encode", "decode", "CoupledQuantizedCache", "calibrate",
           "enable_cq_attention", "save_quantizers", "load_quantizers"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
MAX_BITS = 15


def _check_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_codebooks(codebooks: torch.Tensor, name: str = "codebooks") -> None:
    _check_float(codebooks, name)
    if codebooks.dim() != 3 or 0 in codebooks.shape:
        raise ValueError(f"{name} must have shape (groups, centroids, group_size), got {tuple(codebooks.shape)}")
    if codebooks.shape[1] > 2 ** MAX_BITS:
        raise ValueError(f"{name} has {codebooks.shape[1]} centroids, at most {2 ** MAX_BITS} are supported")


def _check_codes(codes: torch.Tensor, n_centroids: int, name: str = "codes") -> None:
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(codes).__name__}")
    want = reference.cq_code_dtype(n_centroids)
    if codes.dtype != want:
        raise TypeError(f"{name} must be {want} for {n_centroids} centroids, got {codes.dtype}")


def encode(x: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Codes (..., groups) of x (..., groups * group_size): nearest centroid per group, ties to the lowest code.
    Same as ``reference.cq_encode``; x float32/float16/bfloat16 on the CPU or a GPU."""
    _check_encode(x, codebooks)
    return torch.ops.sparse_retrieval.cq_encode(x, codebooks)


def _check_encode(x: torch.Tensor, codebooks: torch.Tensor) -> None:
    """The checks of :func:`encode` that need no data (its fake runs them too)."""
    _check_float(x, "x")
    _check_codebooks(codebooks)
    groups, _, g = codebooks.shape
    if x.dim() == 0 or x.shape[-1] != groups * g:
        raise ValueError(f"x must have {groups} x {g} = {groups * g} channels in its last dimension, "
                         f"got shape {tuple(x.shape)}")
    if x.device != codebooks.device:
        raise ValueError(f"x is on {x.device} but codebooks are on {codebooks.device}")


def decode(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode`: codes (..., groups) -> (..., groups * group_size) in the codebooks' dtype.
    Raises IndexError for a code outside [0, centroids)."""
    _check_decode(codes, codebooks)
    return torch.ops.sparse_retrieval.cq_decode(codes, codebooks)


def _check_decode(codes: torch.Tensor, codebooks: torch.Tensor) -> None:
    """The checks of :func:`decode` that need no data (its fake runs them too)."""
    _check_codebooks(codebooks)
    _check_codes(codes, codebooks.shape[1])
    if codes.dim() == 0 or codes.shape[-1] != codebooks.shape[0]:
        raise ValueError(f"codes must have {codebooks.shape[0]} groups in their last dimension, "
                         f"got shape {tuple(codes.shape)}")
    if codes.device != codebooks.device:
        raise ValueError(f"codes are on {codes.device} but codebooks are on {codebooks.device}")


@fake("cq_encode")
def _encode_fake(x, codebooks):
    _check_encode(x, codebooks)
    groups, k, _ = codebooks.shape
    return x.new_empty((*x.shape[:-1], groups), dtype=reference.cq_code_dtype(k))


@fake("cq_decode")
def _decode_fake(codes, codebooks):
    _check_decode(codes, codebooks)
    groups, _, g = codebooks.shape
    return codebooks.new_empty((*codes.shape[:-1], groups * g))


@fake("cq_attention")
def _attention_fake(q, k_codes, v_codes, k_codebooks, v_codebooks, k_recent=None, v_recent=None, lengths=None,
                    scale=None, starts=None):
    return q.new_empty(q.shape, dtype=torch.float32)


def _kmeans_pp_groups(x: torch.Tensor, w: torch.Tensor, K: int, seed: int, progress: bool, desc: str) -> torch.Tensor:
    """``reference.kmeans_init(x[j], K, w[j], "k-means++", seed + j)`` for every group j at once: the same
    operations and random draws, batched over groups. x (G, m, g), w (G, m) -> (G, K, g)."""
    from tqdm.auto import tqdm  # a declared dependency, imported only where a bar is shown

    G, m, _ = x.shape
    gens = [torch.Generator().manual_seed(seed + j) for j in range(G)]
    rows = torch.arange(G)

    def draw(p, active):
        cdf = torch.cumsum(p, 1)
        u = torch.cat([torch.rand(1, generator=gen) if a else torch.zeros(1) for gen, a in zip(gens, active)])
        return torch.searchsorted(cdf, (u[:, None] * cdf[:, -1:]).contiguous(), right=True)[:, 0].clamp_max(m - 1)

    active = [True] * G
    first = draw(torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w)), active)
    seeds = torch.empty(G, K, dtype=torch.long)
    seeds[:, 0] = first
    d2 = (x - x[rows, first][:, None]).pow(2).sum(2)
    for i in tqdm(range(1, min(K, m)), desc=desc, disable=not progress, leave=False):
        p = d2 * w
        alive = p.sum(1) > 0
        active = [a and bool(v) for a, v in zip(active, alive)]
        if not any(active):
            seeds[:, i:] = seeds[:, i - 1:i]
            break
        nxt = torch.where(torch.tensor(active), draw(p, active), seeds[:, i - 1])
        seeds[:, i] = nxt
        d2 = torch.minimum(d2, (x - x[rows, nxt][:, None]).pow(2).sum(2))
    else:
        seeds[:, min(K, m):] = seeds[:, min(K, m) - 1:min(K, m)]
    return x[rows[:, None], seeds]


class CoupledQuantizer(torch.nn.Module):
    """Coupled quantizer of ``channels``-wide vectors: ``channels / group_size`` groups, ``2**bits`` centroids each.

    Codebooks live in the buffer ``codebooks`` (groups, 2**bits, group_size), float32; ``fit`` learns them,
    ``state_dict()`` / ``load_state_dict()`` save and restore them (and whether they were fitted). ``.to(device)``
    moves them; encode/decode then run on that device's kernels.
    """

    def __init__(self, channels: int, group_size: int, bits: int, seed: int = 0):
        super().__init__()
        for name, v in (("channels", channels), ("group_size", group_size), ("bits", bits), ("seed", seed)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if channels <= 0 or group_size <= 0:
            raise ValueError(f"channels ({channels}) and group_size ({group_size}) must be positive")
        if channels % group_size:
            raise ValueError(f"group_size {group_size} does not divide channels {channels}")
        if not 1 <= bits <= MAX_BITS:
            raise ValueError(f"bits must be in [1, {MAX_BITS}], got {bits}")
        self.channels, self.group_size, self.bits, self.seed = channels, group_size, bits, seed
        self.groups = channels // group_size
        self.n_centroids = 2 ** bits
        self.register_buffer("codebooks", torch.full((self.groups, self.n_centroids, group_size), math.nan))
        self.register_buffer("fitted", torch.tensor(False))
        self.rope: str | None = None  # "post" or "pre": the frame of the keys it was fitted on (set by calibrate)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, group_size={self.group_size}, bits={self.bits} "
                f"({self.bits_per_channel:g} bits/channel)")

    @property
    def bits_per_channel(self) -> float:
        return self.bits / self.group_size

    @property
    def code_dtype(self) -> torch.dtype:
        return reference.cq_code_dtype(self.n_centroids)

    def _require_fitted(self) -> None:
        # Reading a GPU flag synchronises with the device: remember the flag's tensor and version once seen True.
        # Under torch.compile the flag cannot be read without breaking the graph: checked in eager calls only.
        if torch.compiler.is_compiling():
            return
        f = self.fitted
        seen = (id(f), f.data_ptr(), f._version)
        if getattr(self, "_fitted_seen", None) == seen:
            return
        if not bool(f):
            raise RuntimeError("CoupledQuantizer is not fitted: call fit() or load_state_dict() first")
        self._fitted_seen = seen

    def fit(self, x: torch.Tensor, weights: torch.Tensor | None = None, iters: int = 20, init: str = "k-means++",
            init_sample: int = 32, progress: bool = True) -> "CoupledQuantizer":
        """k-means per channel group on calibration rows x (..., channels); returns self.

        ``weights``: per token (n,) or per token and group (n, groups), e.g. summed squared gradients (Fisher).
        Seeds come from ``reference.kmeans_init`` per group (group j with seed ``seed + j``) on at most
        ``init_sample * 2**bits`` rows drawn with ``seed``; Lloyd's steps run over all rows with the assignment on
        the library's encode kernel (CPU SIMD or CUDA, where x lives) and stop early once no code changes.
        Without subsampling, group j equals ``reference.kmeans(x_j, 2**bits, iters, w_j, init, seed + j)``
        up to float rounding.
        """
        _check_float(x, "x")
        if x.dim() == 0 or x.shape[-1] != self.channels:
            raise ValueError(f"x must have {self.channels} channels in its last dimension, got {tuple(x.shape)}")
        if init not in ("k-means++", "random"):
            raise ValueError(f"init must be 'k-means++' or 'random', got {init!r}")
        if not isinstance(iters, int) or iters < 0:
            raise ValueError(f"iters must be a non-negative int, got {iters!r}")
        x = x.reshape(-1, self.channels).float()
        n, G, K, g = x.shape[0], self.groups, self.n_centroids, self.group_size
        if n == 0:
            raise ValueError("x has no rows to fit on")
        if weights is None:
            w = torch.ones(n, G, device=x.device)
        else:
            _check_float(weights, "weights")
            if weights.shape == (n,):
                w = weights.float()[:, None].expand(n, G)
            elif weights.shape == (n, G):
                w = weights.float()
            else:
                raise ValueError(f"weights must have shape ({n},) or ({n}, {G}), got {tuple(weights.shape)}")
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise ValueError("weights must be finite and non-negative")
            w = w.to(x.device)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x must be finite")

        from tqdm.auto import tqdm

        xs = x.reshape(n, G, g)
        cap = init_sample * K
        rows = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[:cap].sort().values
                if n > cap else torch.arange(n))
        sub_x = xs.cpu()[rows].transpose(0, 1).contiguous()  # (G, m, g)
        sub_w = w.cpu()[rows].T.contiguous()  # (G, m)
        # k-means++ is K small sequential steps: extra threads only add synchronisation.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if init == "random":
                books = torch.stack([reference.kmeans_init(sub_x[j], K, sub_w[j], init, self.seed + j)
                                     for j in range(G)])
            else:
                books = _kmeans_pp_groups(sub_x, sub_w, K, self.seed, progress, f"CQ-{g}c{self.bits}b init")
        finally:
            torch.set_num_threads(threads)
        books = books.to(x.device)

        flat_books = books.view(G * K, g)
        weighted = (xs * w[..., None]).reshape(n * G, g)
        offsets = torch.arange(G, device=x.device) * K
        flat_w = w.reshape(n * G)
        previous = None
        for _ in tqdm(range(iters), desc=f"CQ-{g}c{self.bits}b k-means", disable=not progress, leave=False):
            codes = torch.ops.sparse_retrieval.cq_encode(x, books)
            if previous is not None and torch.equal(codes, previous):
                break
            previous = codes
            idx = (codes.long() + offsets).reshape(-1)
            sums = torch.zeros_like(flat_books).index_add_(0, idx, weighted)
            mass = torch.zeros(G * K, device=x.device).index_add_(0, idx, flat_w)
            moved = mass > 0
            flat_books[moved] = sums[moved] / mass[moved, None]
        self.codebooks.copy_(books)
        self.fitted.fill_(True)
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (..., groups) of ``code_dtype`` for x (..., channels)."""
        self._require_fitted()
        return encode(x, self.codebooks)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Float32 vectors (..., channels) for codes (..., groups)."""
        self._require_fitted()
        return decode(codes, self.codebooks)


def attention(q: torch.Tensor, k_codes: torch.Tensor, v_codes: torch.Tensor, k_quantizer: CoupledQuantizer,
              v_quantizer: CoupledQuantizer, k_recent: torch.Tensor | None = None,
              v_recent: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
              scale: float | None = None, starts: torch.Tensor | None = None) -> torch.Tensor:
    """Decode-step attention over coded history plus an optional full-precision window of recent tokens.

    q (B, Hq, Tq, D); k_codes, v_codes (B, Hkv, T, D / g) from quantizers over Hkv * D channels; k_recent,
    v_recent (B, Hkv, W, D); lengths (B,) real coded tokens per sequence; starts (B, Tq) the first position of
    [coded, recent] each query sees (left padding, sliding windows; on CUDA it needs the fused kernel, opt-in with
    SPARSE_RETRIEVAL_CQ_FUSED=1, whose tables of 2 x groups x centroids floats per query row must fit in shared
    memory: 256 centroids at head_dim 128 fit for group sizes of 2 and more). The queries are the last Tq tokens
    of [coded, recent] (causal among the window). Returns float32 (B, Hq, Tq, D), equal to
    ``reference.cq_attention`` within float32 rounding. Scores use a table of q . centroid per group, so the key
    codebooks must be in the queries' frame (post-RoPE keys with post-RoPE queries).
    """
    for name, qz in (("k_quantizer", k_quantizer), ("v_quantizer", v_quantizer)):
        if not isinstance(qz, CoupledQuantizer):
            raise TypeError(f"{name} must be a CoupledQuantizer, got {type(qz).__name__}")
        qz._require_fitted()
    if (k_quantizer.channels, k_quantizer.group_size, k_quantizer.bits) != (
            v_quantizer.channels, v_quantizer.group_size, v_quantizer.bits):
        raise ValueError("k_quantizer and v_quantizer must have the same channels, group_size and bits")
    _check_float(q, "q")
    compiling = torch.compiler.is_compiling()  # value checks would break the graph; the op checks them at run time
    if q.dim() != 4:
        raise ValueError(f"q must have shape (batch, query_heads, query_tokens, head_dim), got {tuple(q.shape)}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not math.isfinite(scale)):
        raise TypeError(f"scale: expected a finite real number or None, got {scale!r}")
    B, Hq, Tq, D = q.shape
    for name, c in (("k_codes", k_codes), ("v_codes", v_codes)):
        _check_codes(c, k_quantizer.n_centroids, name)
        if c.dim() != 4 or c.shape[0] != B:
            raise ValueError(f"{name} must have shape ({B}, kv_heads, tokens, groups), got {tuple(c.shape)}")
    if k_codes.shape != v_codes.shape:
        raise ValueError(f"k_codes {tuple(k_codes.shape)} and v_codes {tuple(v_codes.shape)} differ")
    Hkv, T, G = k_codes.shape[1:]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads {Hq} must be a multiple of kv heads {Hkv}")
    if G * k_quantizer.group_size != D or Hkv * D != k_quantizer.channels:
        raise ValueError(f"codes of {Hkv} heads x {G} groups x {k_quantizer.group_size} channels do not match "
                         f"head_dim {D} and quantizer channels {k_quantizer.channels}")
    if (k_recent is None) != (v_recent is None):
        raise ValueError("give both k_recent and v_recent or neither")
    if k_recent is not None:
        for name, r in (("k_recent", k_recent), ("v_recent", v_recent)):
            _check_float(r, name)
            if r.dim() != 4 or r.shape[:2] != (B, Hkv) or r.shape[3] != D:
                raise ValueError(f"{name} must have shape ({B}, {Hkv}, window, {D}), got {tuple(r.shape)}")
        if k_recent.shape != v_recent.shape:
            raise ValueError(f"k_recent {tuple(k_recent.shape)} and v_recent {tuple(v_recent.shape)} differ")
    if lengths is not None:
        if not isinstance(lengths, torch.Tensor) or lengths.dtype not in (torch.int64, torch.int32):
            raise TypeError("lengths must be an int64 or int32 tensor")
        if lengths.shape != (B,):
            raise ValueError(f"lengths must have shape ({B},), got {tuple(lengths.shape)}")
        if B and not compiling and (int(lengths.min()) < 0 or int(lengths.max()) > T):
            raise ValueError(f"lengths must lie in [0, {T}]")
    if starts is not None:
        if not isinstance(starts, torch.Tensor) or starts.dtype not in (torch.int64, torch.int32):
            raise TypeError("starts must be an int64 or int32 tensor")
        if starts.shape != (B, Tq):
            raise ValueError(f"starts must have shape ({B}, {Tq}), got {tuple(starts.shape)}")
        W = 0 if k_recent is None else k_recent.shape[2]
        if starts.numel() and not compiling and (int(starts.min()) < 0 or int(starts.max()) > T + W):
            raise ValueError(f"starts must lie in [0, {T + W}]")
    devices = {t.device for t in (q, k_codes, v_codes, k_recent, v_recent, lengths, starts, k_quantizer.codebooks,
                                  v_quantizer.codebooks) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"q, codes, recent tokens, lengths and quantizers must be on one device, "
                         f"got {sorted(map(str, devices))}")
    return torch.ops.sparse_retrieval.cq_attention(
        q, k_codes, v_codes, k_quantizer.codebooks, v_quantizer.codebooks,
        k_recent, v_recent, lengths, scale, starts)


def __getattr__(name):
    if name in ("CoupledQuantizedCache", "calibrate", "enable_cq_attention"):
        from . import cache

        return getattr(cache, name)
    if name in ("save_quantizers", "load_quantizers"):
        from . import files

        return getattr(files, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
