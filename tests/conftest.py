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
