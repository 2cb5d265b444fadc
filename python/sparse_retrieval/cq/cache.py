"""Hugging Face ``transformers`` integration: a coupled-quantized KV cache and calibration of its quantizers.

Needs ``transformers`` (tested with 5.23). Calibration and the cache work with any decoder whose attention goes
through the cache (tested: Llama, Qwen3, Gemma 3, Mistral); pre-RoPE keys (``rope="pre"``, ``rotary_emb=``) need
the Llama layout (``model.model.layers[i].self_attn.k_proj`` and ``model.model.rotary_emb``).
"""
from __future__ import annotations

import os
import warnings
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, get_layer_types_and_kwargs
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import CoupledQuantizer, attention

__all__ = ["CoupledQuantizedCache", "CoupledQuantizedLayer", "calibrate", "enable_cq_attention"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotates x (B, H, T, D) by the RoPE angles behind cos/sin (B or 1, T, D), or back with ``inverse``."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos - _rotate_half(x) * sin if inverse else x * cos + _rotate_half(x) * sin


def _rope_angles(rotary_emb, x: torch.Tensor, start: int, n: int):
    positions = torch.arange(start, start + n, device=x.device)[None]
    return rotary_emb(x, positions)


class CoupledQuantizedLayer(DynamicLayer):
    """One layer: ``keys``/``values`` hold the full-precision window (B, Hkv, <= window, D); tokens leaving it are
    coded once into (B, Hkv, T, G) codes (grown by doubling, never re-encoded). A sliding-window layer
    (``sliding_window`` set) frees the codes of positions no later query can see: it holds positions
    [code_start, n_coded) coded, and reports that offset to the attention masks."""

    def __init__(self, k_quantizer: CoupledQuantizer, v_quantizer: CoupledQuantizer, window: int = 128,
                 rotary_emb=None, codes_attention: bool = False, sliding_window: int | None = None):
        super().__init__()
        self.k_quantizer, self.v_quantizer, self.window = k_quantizer, v_quantizer, window
        self.rotary_emb = rotary_emb  # set: keys are coded before RoPE
        self.codes_attention = codes_attention
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self._unread = False  # a window handed to attention without its coded history being read yet
        self.cumulative_length = 0
        self.n_coded = 0  # positions coded so far
        self.code_start = 0  # the first position whose codes are held (0 but for sliding layers)
        self._k_codes = self._v_codes = None

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        B, H, _, D = key_states.shape
        if H * D != self.k_quantizer.channels:
            raise ValueError(f"layer keys have {H} heads x {D} = {H * D} channels, the quantizer expects "
                             f"{self.k_quantizer.channels}")
        shape = (B, H, 0, self.k_quantizer.groups // H)
        self._k_codes = torch.empty(shape, dtype=self.k_quantizer.code_dtype, device=key_states.device)
        self._v_codes = torch.empty_like(self._k_codes)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def _live_start(self) -> int:
        """The first coded position the next queries (from position cumulative_length on) can still see."""
        if self.sliding_window is None:
            return self.code_start
        return max(self.code_start, min(self.cumulative_length - self.sliding_window + 1, self.n_coded))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Called before update, which frees the codes below _live_start(): the mask starts there.
        offset = self._live_start()
        return self.cumulative_length + query_length - offset, offset

    @property
    def k_codes(self) -> torch.Tensor:
        return self._k_codes[:, :, :self.n_coded - self.code_start]

    @property
    def v_codes(self) -> torch.Tensor:
        return self._v_codes[:, :, :self.n_coded - self.code_start]

    def _encode(self, quantizer: CoupledQuantizer, x: torch.Tensor) -> torch.Tensor:
        B, H, n, D = x.shape
        codes = quantizer.encode(x.transpose(1, 2).reshape(B, n, H * D))
        return codes.reshape(B, n, H, -1).transpose(1, 2)

    def _decode(self, quantizer: CoupledQuantizer, codes: torch.Tensor) -> torch.Tensor:
        B, H, n, G = codes.shape
        x = quantizer.decode(codes.transpose(1, 2).reshape(B, n, H * G))
        return x.reshape(B, n, H, quantizer.channels // H).transpose(1, 2)

    def _append_codes(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        n = keys.shape[2]
        if self.rotary_emb is not None:
            keys = _rope(keys, *_rope_angles(self.rotary_emb, keys, self.n_coded, n), inverse=True)
        held = self.n_coded - self.code_start
        if held + n > self._k_codes.shape[2]:
            capacity = max(held + n, 2 * held, 64)
            for name in ("_k_codes", "_v_codes"):
                old = getattr(self, name)
                new = old.new_empty((*old.shape[:2], capacity, old.shape[3]))
                new[:, :, :held] = old[:, :, :held]
                setattr(self, name, new)
        self._k_codes[:, :, held:held + n] = self._encode(self.k_quantizer, keys)
        self._v_codes[:, :, held:held + n] = self._encode(self.v_quantizer, values)
        self.n_coded += n

    def _free_unseen(self) -> None:
        """Drops the codes no later query can see (sliding layers); the buffer shrinks at its next growth."""
        drop = self._live_start() - self.code_start
        if drop > 0:
            self._k_codes, self._v_codes = self._k_codes[:, :, drop:], self._v_codes[:, :, drop:]
            self.code_start += drop

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The coded history held, decoded (post-RoPE keys), in the window's dtype."""
        keys = self._decode(self.k_quantizer, self.k_codes)
        if self.rotary_emb is not None and self.n_coded > self.code_start:
            keys = _rope(keys, *_rope_angles(self.rotary_emb, keys, self.code_start, self.n_coded - self.code_start))
        return keys.to(self.dtype), self._decode(self.v_quantizer, self.v_codes).to(self.dtype)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._free_unseen()
        n = key_states.shape[-2]
        self.cumulative_length += n
        self.keys = torch.cat([self.keys, key_states], dim=-2) if self.keys.numel() else key_states
        self.values = torch.cat([self.values, value_states], dim=-2) if self.values.numel() else value_states
        overflow = self.keys.shape[-2] - self.window
        # A prefill attends over its own keys in full precision; its overflow is coded afterwards.
        full = None
        if n > self.window:
            hist_k, hist_v = self.dequantized()
            full = torch.cat([hist_k, self.keys], -2), torch.cat([hist_v, self.values], -2)
        if overflow > 0:
            self._append_codes(self.keys[:, :, :overflow], self.values[:, :, :overflow])
            self.keys = self.keys[:, :, overflow:].contiguous()
            self.values = self.values[:, :, overflow:].contiguous()
        if full is not None:
            return full
        if self.codes_attention and self.rotary_emb is None:
            # The window alone goes back: only the "cq" attention function adds the coded history. A model whose
            # attention is another one would silently ignore the history, so the next step refuses to go on.
            if self._unread:
                raise RuntimeError("CoupledQuantizedCache(codes_attention=True): the model's attention did not read "
                                   "the coded history (it is not the 'cq' implementation); pass model= to the "
                                   "cache or call sparse_retrieval.cq.enable_cq_attention(model)")
            self._unread = self.n_coded > self.code_start
            keys, values = self.keys.view_as(self.keys), self.values.view_as(self.values)
            keys._cq_layer = self  # read by the "cq" attention function
            return keys, values
        if self.codes_attention:  # pre-RoPE codes: the history must be decoded and rotated again
            _warn_once("pre-rope", "CoupledQuantizedCache(codes_attention=True) with pre-RoPE codes (rotary_emb=) "
                                   "decodes the history every step; calibrate with rope='post' to attend from codes")
        hist_k, hist_v = self.dequantized()
        return torch.cat([hist_k, self.keys], -2), torch.cat([hist_v, self.values], -2)

    def nbytes(self) -> dict:
        """Bytes held for the tokens stored now: codes (exactly n_coded tokens) and the full-precision window."""
        code = self.k_codes.numel() * self.k_codes.element_size() * 2 if self.is_initialized else 0
        win = (self.keys.numel() * self.keys.element_size() * 2) if self.is_initialized else 0
        return {"codes": code, "window": win}

    def _select_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self._k_codes, self._v_codes = fn(self._k_codes), fn(self._v_codes)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        if n > self.keys.shape[-2]:
            raise ValueError(f"cannot crop {n} tokens: only the {self.keys.shape[-2]} window tokens can be removed, "
                             "coded history is final")
        self.keys, self.values = self.keys[:, :, :-n], self.values[:, :, :-n]
        self.cumulative_length -= n

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = self.n_coded = self.code_start = 0
        self._k_codes = self._v_codes = None


class CoupledQuantizedCache(Cache):
    """A ``transformers`` cache that keeps the last ``window`` tokens of each layer in full precision and codes
    older tokens once with the layer's coupled quantizers (as returned by :func:`calibrate`).

    Keys are coded **post-RoPE** (as transformers hands them over), which lets attention run from the codes:
    with ``codes_attention=True`` and ``enable_cq_attention(model)``, decode steps call
    :func:`sparse_retrieval.cq.attention` instead of dequantizing the history (``model`` is then required: its
    attention is switched to the "cq" implementation, see :func:`enable_cq_attention`; a model whose attention
    does not read the codes makes the next decode step raise). ``rotary_emb=model.model.rotary_emb``
    codes keys **pre-RoPE** instead (quantizers calibrated with ``rope="pre"``): history is then decoded and
    re-rotated every step, with positions taken to start at 0 (no left padding).

    Codes attention also serves masked steps on the CPU: a left-padded batch and sliding-window layers give
    causal masks with a first visible position per query, which the kernel applies (``starts=``). Any other mask,
    or a GPU, decodes the history for that step (with a warning, once).

    Sliding-window layers (read from ``model.config`` or ``config=``, as transformers reads them) free the codes of
    tokens that fell out of every window; without a config every layer keeps its whole history (correct, larger).
    :meth:`nbytes` reports bytes per layer type.
    """

    def __init__(self, quantizers: Sequence[tuple[CoupledQuantizer, CoupledQuantizer]], window: int = 128,
                 rotary_emb=None, codes_attention: bool = False, model=None, config=None):
        if codes_attention and rotary_emb is None and model is None:
            raise ValueError("codes_attention=True: pass model= (its attention is switched to the 'cq' "
                             "implementation, which reads the codes)")
        if not isinstance(window, int) or window < 0:
            raise ValueError(f"window must be a non-negative int, got {window!r}")
        if not quantizers:
            raise ValueError("quantizers must hold one (key, value) pair of CoupledQuantizer per layer")
        for i, pair in enumerate(quantizers):
            if len(pair) != 2 or not all(isinstance(q, CoupledQuantizer) for q in pair):
                raise TypeError(f"quantizers[{i}] must be a (key, value) pair of CoupledQuantizer")
            for q in pair:
                q._require_fitted()
            frame = pair[0].rope
            if frame is not None and frame != ("pre" if rotary_emb is not None else "post"):
                raise ValueError(f"quantizers[{i}] were calibrated on {frame}-RoPE keys; "
                                 + ("pass rotary_emb= (pre-RoPE coding)" if frame == "pre" else
                                    "this cache codes pre-RoPE keys (rotary_emb= given): calibrate with rope='pre'"))
        self.window = window
        slides = _sliding_windows(config if config is not None else getattr(model, "config", None), len(quantizers))
        super().__init__(layers=[CoupledQuantizedLayer(k, v, window, rotary_emb, codes_attention, slide)
                                 for (k, v), slide in zip(quantizers, slides)])
        if codes_attention and rotary_emb is None:
            enable_cq_attention(model)

    def nbytes(self) -> dict:
        """Bytes of codes and of full-precision window over all layers, and per layer type ("full_attention",
        "sliding_attention")."""
        totals = {"codes": 0, "window": 0, "by_layer_type": {}}
        for layer in self.layers:
            kind = totals["by_layer_type"].setdefault("sliding_attention" if layer.is_sliding else "full_attention",
                                                       {"codes": 0, "window": 0})
            for k, v in layer.nbytes().items():
                totals[k] += v
                kind[k] += v
        return totals


def _sliding_windows(config, n_layers: int) -> list:
    """Each layer's sliding window (None: the layer attends to everything) as transformers reads the config."""
    if config is None:
        return [None] * n_layers
    types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    if len(types) != n_layers:
        raise ValueError(f"the model has {len(types)} layers, the quantizers cover {n_layers}")
    return [kw.get("sliding_window") if kind == "sliding_attention" else None for kind, kw in zip(types, kwargs)]


def _cq_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    layer = getattr(key, "_cq_layer", None)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    layer._unread = False
    starts = None
    if attention_mask is not None:  # left padding or a sliding window: a first visible position per query
        starts = _mask_starts(attention_mask, query.shape[0], query.shape[2], layer.k_codes.shape[2] + key.shape[2])
        # On CUDA only the fused kernel (opt-in, SPARSE_RETRIEVAL_CQ_FUSED=1) applies starts.
        cuda_fused = query.device.type == "cuda" and os.environ.get("SPARSE_RETRIEVAL_CQ_FUSED") == "1"
        if starts is None or not (query.device.type == "cpu" or cuda_fused):
            _warn_once("mask", "CoupledQuantizedCache(codes_attention=True): this attention mask (not a causal mask "
                               "with left padding or a sliding window, or on a GPU without "
                               "SPARSE_RETRIEVAL_CQ_FUSED=1) is applied to the decoded history instead of attending "
                               "from the codes")
            hist_k, hist_v = layer.dequantized()
            return sdpa_attention_forward(module, query, torch.cat([hist_k, key], -2),
                                          torch.cat([hist_v, value], -2), attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
    out = attention(query, layer.k_codes, layer.v_codes, layer.k_quantizer, layer.v_quantizer, key, value,
                    scale=scaling, starts=starts)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _mask_starts(mask: torch.Tensor, batch: int, tq: int, length: int) -> torch.Tensor | None:
    """(batch, tq) first visible positions when the boolean mask (batch or 1, 1, tq, length) lets query t see
    exactly the positions [start, length - tq + t] (causal, after left padding or outside a sliding window),
    else None."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[0] not in (1, batch) or \
            tuple(mask.shape[1:]) != (1, tq, length):
        return None
    m = mask[:, 0].expand(batch, tq, length)
    pos = torch.arange(length, device=m.device)
    last = length - tq + torch.arange(tq, device=m.device)
    starts = torch.where(m.any(-1), m.to(torch.uint8).argmax(-1), last + 1)
    if not torch.equal(m, (pos >= starts[..., None]) & (pos <= last[:, None])):
        return None
    return starts


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=3)


def enable_cq_attention(model) -> None:
    """Registers the "cq" attention implementation (attention from codes at decode steps of a
    ``CoupledQuantizedCache(codes_attention=True)``, SDPA otherwise) and switches ``model`` to it."""
    ALL_ATTENTION_FUNCTIONS.register("cq", _cq_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register("cq", sdpa_mask)
    model.set_attn_implementation("cq")


def _token_batches(texts, tokenizer, max_length: int):
    if isinstance(texts, torch.Tensor):
        texts = list(texts) if texts.dim() == 2 else [texts]
    for t in texts:
        if isinstance(t, str):
            if tokenizer is None:
                raise ValueError("texts are strings: pass tokenizer=")
            t = torch.tensor(tokenizer(t)["input_ids"])
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.long:
            raise TypeError("texts must be strings or 1-D int64 token-id tensors")
        if t.numel():
            yield t[:max_length][None]


class _RecordingCache(DynamicCache):
    """The cache of a calibration forward: records what each layer's attention hands to the cache (keys after every
    norm and rotation the architecture applies, values), and with ``fisher`` the gradients of the loss with respect
    to them."""

    def __init__(self, config, records: dict, fisher: bool):
        super().__init__(config=config)
        self._records, self._fisher = records, fisher

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        rec = self._records.setdefault(layer_idx, ([], [], [], []))
        rec[0].append(_tokens(key_states.detach()))
        rec[1].append(_tokens(value_states.detach()))
        if self._fisher and key_states.requires_grad:
            key_states.register_hook(lambda g: rec[2].append(_tokens(g.detach())))
            value_states.register_hook(lambda g: rec[3].append(_tokens(g.detach())))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """(1, H, T, D) -> (T, H * D): heads outermost, as the quantizers' channels."""
    return t.transpose(1, 2).reshape(-1, t.shape[1] * t.shape[3])


def _calibration_forward(model, ids: torch.Tensor, fisher: bool, **kwargs) -> None:
    """One forward of ``ids``; with ``fisher`` also the backward pass of its language-modelling loss (the gradients
    reach the hooks the recorders registered), the parameters' gradients dropped afterwards."""
    if fisher:
        with torch.enable_grad():
            model(input_ids=ids, labels=ids, **kwargs).loss.backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            model(input_ids=ids, **kwargs)


def _record_cache_inputs(model, batches, fisher: bool, progress: bool) -> list:
    records = {}
    for ids in tqdm(batches, desc="calibration forward", disable=not progress, leave=False):
        _calibration_forward(model, ids, fisher, past_key_values=_RecordingCache(model.config, records, fisher),
                             use_cache=True)
    missing = sorted(set(range(max(records, default=-1) + 1)) - set(records))
    if not records or missing:
        raise ValueError(f"calibrate: layers {missing or 'all'} never handed keys to the cache (does the model "
                         "take past_key_values?)")
    return [records[i] for i in range(len(records))]


def _record_projections(model, batches, fisher: bool, progress: bool) -> list:
    """Pre-RoPE keys (outputs of k_proj) and values of a Llama-layout model, with forward hooks."""
    try:
        layers = model.model.layers
        projections = [(layer.self_attn.k_proj, layer.self_attn.v_proj) for layer in layers]
    except AttributeError:
        projections = None
    if not projections or not all(isinstance(p, torch.nn.Module) for pair in projections for p in pair):
        raise ValueError("calibrate(rope='pre') needs a Llama-layout model (model.model.layers[i].self_attn.k_proj "
                         "and v_proj); rope='post' works with any architecture")
    records = [([], [], [], []) for _ in layers]

    def capture(rec, which):
        def hook(_module, _inp, out):
            rec[which].append(out.detach().reshape(-1, out.shape[-1]))
            if fisher:
                out.register_hook(lambda g: rec[which + 2].append(g.detach().reshape(-1, g.shape[-1])))
        return hook

    handles = [proj.register_forward_hook(capture(rec, which))
               for rec, pair in zip(records, projections) for which, proj in enumerate(pair)]
    try:
        for ids in tqdm(batches, desc="calibration forward", disable=not progress, leave=False):
            _calibration_forward(model, ids, fisher, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return records


def calibrate(model, texts, group_size: int, bits: int, fisher: bool = False, tokenizer=None,
              max_length: int = 2048, rope: str = "post", iters: int = 20, seed: int = 0,
              progress: bool = True) -> list[tuple[CoupledQuantizer, CoupledQuantizer]]:
    """Fits one (key, value) pair of coupled quantizers per layer on the keys/values the model computes for
    ``texts`` (strings with ``tokenizer``, or 1-D token-id tensors).

    ``rope="post"`` (for ``CoupledQuantizedCache``'s default) records exactly what each layer hands to the cache:
    keys after every norm and rotation, so any architecture whose attention uses the cache works (Llama, Qwen3's
    key norms, Gemma 3's sliding and global layers, MQA/GQA, layers of different shapes). ``"pre"`` fits keys
    before RoPE, captured at ``k_proj`` of a Llama-layout model. ``fisher=True`` also runs a backward pass of the
    language-modelling loss and weights each token's channel group by its summed squared gradient (Fisher
    information) with respect to the same tensors."""
    if rope not in ("post", "pre"):
        raise ValueError(f"rope must be 'post' or 'pre', got {rope!r}")
    device = next(model.parameters()).device
    batches = [ids.to(device) for ids in _token_batches(texts, tokenizer, max_length)]
    if not batches:
        raise ValueError("texts hold no tokens")
    was_training = model.training
    model.eval()
    try:
        record = _record_cache_inputs if rope == "post" else _record_projections
        records = record(model, batches, fisher, progress)
    finally:
        model.train(was_training)

    def weights(grads):  # one gradient per text, in text order (each backward runs before the next forward)
        g = torch.cat(grads).float()
        return g.pow(2).reshape(g.shape[0], -1, group_size).sum(-1)

    quantizers = []
    for keys, values, k_grads, v_grads in tqdm(records, desc="fitting quantizers", disable=not progress):
        k_x, v_x = torch.cat(keys).float(), torch.cat(values).float()
        k_w, v_w = (weights(k_grads), weights(v_grads)) if fisher else (None, None)
        kq = CoupledQuantizer(k_x.shape[1], group_size, bits, seed).fit(k_x, k_w, iters=iters, progress=False)
        vq = CoupledQuantizer(v_x.shape[1], group_size, bits, seed).fit(v_x, v_w, iters=iters, progress=False)
        kq.rope = vq.rope = rope
        quantizers.append((kq, vq))
    return quantizers
