"""Saving and loading the quantizers of a KV cache: one safetensors file with every layer's key and value
codebooks and what they were fitted on (group size, bits, RoPE mode, the model's shape and a hash of its config).

The file is written atomically; reading checks its checksum, its layout and, given the model, that the model is the
one the quantizers were calibrated for. Needs ``safetensors`` (installed with ``transformers``).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Sequence

import torch

from .._files import write_atomic
from . import CoupledQuantizer

__all__ = ["save_quantizers", "load_quantizers"]

_FORMAT = "sparse_retrieval.cq.quantizers/1"
# The config fields that decide the shapes and meaning of the keys a cache receives.
_CONFIG_FIELDS = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "hidden_size", "vocab_size", "rope_theta", "rope_scaling", "layer_types", "sliding_window")


def _config_hash(model) -> str:
    config = model.config.to_dict()
    fields = {k: config.get(k) for k in _CONFIG_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _checksum(tensors: dict[str, torch.Tensor]) -> int:
    crc = 0
    for name in sorted(tensors):
        crc = zlib.crc32(tensors[name].contiguous().view(torch.uint8).numpy(), zlib.crc32(name.encode(), crc))
    return crc


def save_quantizers(path: str | os.PathLike, quantizers: Sequence[tuple[CoupledQuantizer, CoupledQuantizer]],
                    model=None) -> None:
    """Writes the (key, value) quantizer pairs of every layer (as returned by ``calibrate``) to ``path``. With
    ``model``, its config hash is stored so that ``load_quantizers(path, model)`` can refuse another model."""
    from safetensors.torch import save

    if not quantizers:
        raise ValueError("quantizers: expected one (key, value) pair per layer, got none")
    tensors, layers = {}, []
    for i, pair in enumerate(quantizers):
        if len(pair) != 2 or not all(isinstance(q, CoupledQuantizer) for q in pair):
            raise TypeError(f"quantizers[{i}] must be a (key, value) pair of CoupledQuantizer")
        for kind, q in zip("kv", pair):
            q._require_fitted()
            tensors[f"{i}.{kind}"] = q.codebooks.detach().float().cpu().contiguous()
        k, v = pair
        layers.append({"channels": [k.channels, v.channels], "group_size": [k.group_size, v.group_size],
                       "bits": [k.bits, v.bits], "seed": [k.seed, v.seed], "rope": k.rope})
    meta = {"format": _FORMAT, "layers": json.dumps(layers), "checksum": str(_checksum(tensors)),
            "config_hash": _config_hash(model) if model is not None else "",
            "model_type": str(model.config.model_type) if model is not None else ""}
    data = save(tensors, metadata=meta)
    write_atomic(Path(path), lambda f: f.write(data))


def load_quantizers(path: str | os.PathLike, model=None,
                    device: torch.device | str | None = None) -> list[tuple[CoupledQuantizer, CoupledQuantizer]]:
    """The quantizers written by ``save_quantizers``, on ``device`` (default: the model's, else the CPU). With
    ``model``, raises ``ValueError`` when they were saved for a model of another config, or when their layer count
    or channels do not match the model's. A damaged file raises ``ValueError``."""
    from safetensors.torch import load

    path = Path(path)
    data = path.read_bytes()
    try:
        (head_len,) = struct.unpack_from("<Q", data)
        meta = json.loads(data[8:8 + head_len]).get("__metadata__") or {}
        tensors = load(data)
        layers = json.loads(meta["layers"])
    except Exception as exc:  # any parse failure of a damaged file
        raise ValueError(f"{path}: not a readable quantizer file ({exc})") from None
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {_FORMAT!r}")
    if set(tensors) != {f"{i}.{kind}" for i in range(len(layers)) for kind in "kv"}:
        raise ValueError(f"{path}: tensors do not match the {len(layers)} layers described")
    if str(_checksum(tensors)) != meta.get("checksum"):
        raise ValueError(f"{path}: checksum mismatch (corrupted file)")
    if model is not None:
        if meta.get("config_hash") and meta["config_hash"] != _config_hash(model):
            raise ValueError(f"{path}: the quantizers were calibrated for another model ({meta.get('model_type')} "
                             f"config {meta['config_hash']}, this {model.config.model_type} model has "
                             f"{_config_hash(model)})")
        if len(layers) != model.config.num_hidden_layers:
            raise ValueError(f"{path}: {len(layers)} layers of quantizers, the model has "
                             f"{model.config.num_hidden_layers}")
        device = device if device is not None else next(model.parameters()).device
    out = []
    for i, layer in enumerate(layers):
        pair = []
        for j, kind in enumerate("kv"):
            books = tensors[f"{i}.{kind}"]
            try:
                q = CoupledQuantizer(layer["channels"][j], layer["group_size"][j], layer["bits"][j],
                                     layer["seed"][j])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}: layer {i} {kind}: {exc}") from None
            if books.shape != q.codebooks.shape or not bool(torch.isfinite(books).all()):
                raise ValueError(f"{path}: layer {i} {kind}: codebooks of shape {tuple(books.shape)}, expected "
                                 f"{tuple(q.codebooks.shape)} and finite")
            q.codebooks.copy_(books)
            q.fitted.fill_(True)
            q.rope = layer.get("rope")
            pair.append(q.to(device) if device is not None else q)
        out.append(tuple(pair))
    return out
