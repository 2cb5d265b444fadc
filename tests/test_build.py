"""Build facts, the SIMD level switch and the torch.ops namespace."""
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparse_retrieval as sr

LEVELS = ["scalar", "neon", "avx2", "avx512"]


def test_build_info():
    info = sr.build_info()
    assert {"version", "torch", "cuda", "simd", "threads"} <= info.keys()
    assert info["version"] == sr.__version__ == importlib.metadata.version("sparse_retrieval")
    assert info["torch"] == torch.__version__  # built against the torch it runs with
    if torch.version.cuda is None:
        assert info["cuda"] is False
    else:
        assert info["cuda"] is False or (info["cuda"]["version"] and info["cuda"]["archs"])
    simd = info["simd"]
    assert "scalar" in simd["supported"]
    assert set(simd["supported"]) <= set(simd["compiled"]) <= set(LEVELS)
    assert simd["detected"] == simd["supported"][-1]  # the best supported level
    assert simd["active"] in simd["supported"]
    assert info["threads"] == torch.get_num_threads() >= 1


def test_installed_package_is_tested():
    """The tests must exercise the installed wheel, not the source tree (a file missing from the wheel must fail)."""
    source = (Path(__file__).resolve().parents[1] / "python").resolve()
    assert source not in Path(sr.__file__).resolve().parents


def test_set_and_get_simd_level():
    before = sr.get_simd_level()
    try:
        for level in sr.supported_simd_levels():
            sr.set_simd_level(level)
            assert sr.get_simd_level() == level == sr.build_info()["simd"]["active"]
    finally:
        sr.set_simd_level(before)


def test_simd_level_context_manager_restores():
    before = sr.get_simd_level()
    for level in sr.supported_simd_levels():
        with sr.simd_level(level):
            assert sr.get_simd_level() == level
        assert sr.get_simd_level() == before
    with pytest.raises(RuntimeError, match="boom"):
        with sr.simd_level("scalar"):
            raise RuntimeError("boom")
    assert sr.get_simd_level() == before


@pytest.mark.parametrize("level", ["avx1024", "", "AVX2", "sse", *[lv for lv in LEVELS if lv not in sr.supported_simd_levels()]])
def test_unknown_or_unsupported_level_raises(level):
    before = sr.get_simd_level()
    with pytest.raises(ValueError, match="unknown SIMD level|not compiled into this build or not supported"):
        sr.set_simd_level(level)
    with pytest.raises(ValueError):
        with sr.simd_level(level):
            pass
    assert sr.get_simd_level() == before


PROBE = """
import sparse_retrieval as sr
try:
    print("level", sr.get_simd_level())
except ValueError as e:
    print("error", e)
sr.set_simd_level("scalar")  # an explicit choice overrides the variable
print("after", sr.get_simd_level())
"""


def run_probe(value):
    env = dict(os.environ, SPARSE_RETRIEVAL_SIMD=value)
    # Run away from the source tree so the installed package is imported.
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_env_var_selects_level():
    # The lowest and the best level cover both ends; each run costs an interpreter start.
    for level in {sr.supported_simd_levels()[0], sr.supported_simd_levels()[-1]}:
        assert run_probe(level) == [f"level {level}", "after scalar"]


@pytest.mark.parametrize("value,message", [
    ("bogus", "SPARSE_RETRIEVAL_SIMD=bogus: unknown SIMD level 'bogus'"),
    (next((lv for lv in LEVELS if lv not in sr.supported_simd_levels()), None),
     "is not compiled into this build or not supported by this CPU"),
])
def test_bad_env_var_errors_on_first_use(value, message):
    if value is None:
        pytest.skip("every SIMD level is supported here")
    out = run_probe(value)
    assert out[0].startswith("error SPARSE_RETRIEVAL_SIMD=") and message in out[0]
    assert out[1] == "after scalar"


def test_ops_namespace_is_registered():
    assert isinstance(torch.ops.sparse_retrieval, torch._ops._OpNamespace)
    # The extension owns the namespace (its TORCH_LIBRARY block), so a second definition must be refused.
    with pytest.raises(RuntimeError, match="single TORCH_LIBRARY .* namespace sparse_retrieval"):
        torch.library.Library("sparse_retrieval", "DEF")
    # Every op registered under the namespace is reachable as torch.ops.sparse_retrieval.<name>.
    names = {n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("sparse_retrieval::")}
    for name in names:
        assert isinstance(getattr(torch.ops.sparse_retrieval, name), torch._ops.OpOverloadPacket)
