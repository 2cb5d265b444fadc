"""``fake(op)``: registers a fake (meta) implementation of ``sparse_retrieval::op`` for torch.compile, wrapped so
that real tensors on different devices raise. The dispatcher sends a call with any meta input to the fake, and a
fake that answered such a call would hand back an uninitialised tensor on another input's device."""
from __future__ import annotations

import functools

import torch


def _devices(args) -> set:
    out = set()
    for a in args:
        if isinstance(a, torch.Tensor):
            out.add(a.device)
        elif isinstance(a, (list, tuple)):
            out |= _devices(a)
    return out


def fake(op: str):
    def register(fn):
        @functools.wraps(fn)
        def checked(*args, **kwargs):
            devices = _devices(list(args) + list(kwargs.values()))
            if len(devices) > 1:
                raise ValueError(f"sparse_retrieval::{op}: all tensors must be on one device, got "
                                 f"{sorted(map(str, devices))}")
            return fn(*args, **kwargs)

        torch.library.register_fake(f"sparse_retrieval::{op}")(checked)
        return fn

    return register


def check_range(value: int, name: str, high: int = 2**31) -> None:
    """The range check of an int argument that the op's C++ checks make, for its fake: without it a negative k or dim
    surfaces as torch's "negative dimension" error, naming nothing."""
    if not 0 <= value < high:
        raise ValueError(f"{name}: must lie in [0, {high}), got {value}")
