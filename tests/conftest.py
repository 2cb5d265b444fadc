import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import sparse_retrieval as sr

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=sr.supported_simd_levels())
def simd(request):
    """Runs the test once per SIMD level this build and CPU support (scalar always), forcing CPU kernels onto it."""
    with sr.simd_level(request.param):
        yield request.param


@pytest.fixture(params=DEVICES)
def device(request):
    """'cpu', and 'cuda' whenever a GPU is present."""
    return request.param


CSRC = Path(__file__).resolve().parent.parent / "csrc"


def build_emulation(tmp_path_factory, source: str, header: str) -> Path:
    """Compiles tests/<source>, a host emulation of a CUDA kernel whose per-thread code is csrc/<header>, with the
    system C++ compiler (no CUDA needed)."""
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None or not (CSRC / header).exists():
        pytest.skip("needs a C++ compiler and the source tree")
    exe = tmp_path_factory.mktemp(Path(source).stem) / "emulation"
    subprocess.run([cxx, "-std=c++17", "-O2", "-I", str(CSRC), str(Path(__file__).with_name(source)), "-o", str(exe)],
                   check=True)
    return exe
