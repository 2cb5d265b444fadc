"""Build facts and the CPU SIMD level switch."""
from __future__ import annotations

import contextlib

import torch

from . import _C


def build_info() -> dict:
    """What this build is: versions, CUDA, SIMD levels and threads."""
    return {
        "version": _C.__version__,
        "torch": _C.torch_version,
        "torch_runtime": torch.__version__,
        "cuda": {"version": _C.cuda_version, "archs": _C.cuda_archs.split(";")} if _C.cuda_version else False,
        "cuda_available": torch.cuda.is_available(),
        "simd": {"compiled": _C.simd_compiled(), "supported": _C.simd_supported(),
                 "detected": _C.simd_detected(), "active": _C.simd_get()},
        "threads": torch.get_num_threads(),
    }


def supported_simd_levels() -> list[str]:
    """SIMD levels compiled into this build that this CPU can run, lowest first."""
    return _C.simd_supported()


def get_simd_level() -> str:
    """The level CPU kernels use now."""
    return _C.simd_get()


def set_simd_level(level: str) -> None:
    """Forces CPU kernels onto one level ("scalar", "neon", "avx2", "avx512"), process-wide.
    The environment variable SPARSE_RETRIEVAL_SIMD sets the starting level. Raises ValueError if the level is
    unknown, not compiled, or not supported by this CPU."""
    _C.simd_set(level)


@contextlib.contextmanager
def simd_level(level: str):
    """Runs a block with CPU kernels forced onto ``level``, then restores the previous level."""
    previous = get_simd_level()
    set_simd_level(level)
    try:
        yield
    finally:
        set_simd_level(previous)
