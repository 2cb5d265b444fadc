"""topk and topk_sparsify against sparse_retrieval.reference and torch.topk, on every SIMD level (and CUDA when a
GPU is present)."""
import math
import subprocess
import sys

import pytest
import torch

import sparse_retrieval as sr
from sparse_retrieval import reference

from conftest import build_emulation

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KINDS = ["randn", "ties", "special"]


def make(shape, dtype, kind, gen, device="cpu"):
    """Random data: plain normal, many exact ties, or normal sprinkled with NaN, +/-inf and +/-0."""
    if kind == "ties":
        x = torch.randint(-3, 4, shape, generator=gen).float()
    else:
        x = torch.randn(shape, generator=gen)
    if kind == "special" and x.numel():
        flat = x.view(-1)
        pos = torch.randint(0, flat.numel(), (max(1, flat.numel() // 7),), generator=gen)
        choice = torch.tensor([math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0])
        flat[pos] = choice[torch.randint(0, len(choice), pos.shape, generator=gen)]
    return x.to(dtype).to(device)


def check(x, k, dim=-1, largest=True, sorted=True):
    values, indices = sr.topk(x, k, dim, largest, sorted)
    ref_values, ref_indices = reference.topk(x, k, dim, largest)
    assert values.dtype == x.dtype and indices.dtype == torch.int64
    assert values.device == x.device and indices.device == x.device
    assert values.shape == ref_values.shape and indices.shape == ref_indices.shape
    if not sorted:  # same selection in any order: bring both into index order
        indices, order = indices.sort(dim)
        values = values.gather(dim, order)
        ref_indices, order = ref_indices.sort(dim)
        ref_values = ref_values.gather(dim, order)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(values, ref_values, rtol=0, atol=0, equal_nan=True)
    # The values are the input's own entries at those indices, bit for bit.
    xs, ix, vs = (x.reshape(1), indices.reshape(-1), values.reshape(-1)) if x.dim() == 0 else (x, indices, values)
    bits = lambda t: t.view(torch.int16 if t.element_size() == 2 else torch.int32)  # noqa: E731
    assert torch.equal(bits(xs.gather(dim, ix)), bits(vs))
    if sorted and not (x.dim() == 0 and k == 0):  # torch.topk returns the element there
        # On the CPU: torch's CUDA top-k ranks a NaN with its sign bit set below every number.
        torch_values = torch.topk(x.cpu(), k, dim, largest, True)[0].to(x.device)
        torch.testing.assert_close(values, torch_values, rtol=0, atol=0, equal_nan=True)


def rows_and_k(dtype, kind, device="cpu"):
    gen = torch.Generator().manual_seed(hash((dtype, kind)) % 1000)
    for rows, n in [(1, 1), (3, 7), (5, 33), (2, 129), (7, 1000), (1, 4097)]:
        x = make((rows, n), dtype, kind, gen, device)
        for k in sorted({0, 1, min(2, n), n // 3, n - 1, n}):
            for largest in (True, False):
                check(x, k, largest=largest)
        check(x, n // 2, largest=True, sorted=False)
        check(x, n // 2, largest=False, sorted=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_rows_and_k(simd, dtype, kind):
    rows_and_k(dtype, kind)


# The CUDA kernels take k <= SMALL_K to the block selection (csrc/kernels/cuda/topk_small.cu) and larger k to the
# radix select (topk.cu).
SMALL_K = 256


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_rows_and_k(dtype, kind):
    rows_and_k(dtype, kind, "cuda")
    gen = torch.Generator().manual_seed(31)
    for shape, k in [
        # Radix select: long rows split over several blocks; ties make the index passes run.
        ((3, 70_001), 2000), ((5, 40_000), SMALL_K + 1), ((64, 3000), SMALL_K + 1),
        # Block selection: 8, 4 and 2 rows per block (rows not a multiple of that), a block per row, and rows few
        # enough to be split into parts (at least 2 x 16384 elements) merged by a second pass.
        ((1001, 100), 33), ((37, 300), SMALL_K), ((9, 1000), 100), ((300, 2049), 64), ((200, 5000), 1),
        ((1, 1_000_003), 100), ((2, 100_003), SMALL_K), ((7, 40_000), 31),
    ]:
        x = make(shape, dtype, kind, gen, "cuda")
        check(x, k)
        check(x, k, largest=False, sorted=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_one_read_small(monkeypatch, dtype, kind):
    """SPARSE_RETRIEVAL_TOPK_RESIDENT=1: the one-read radix select (topk_resident.h) on rows of one and several
    blocks, ties across blocks (small enough for compute-sanitizer's racecheck)."""
    monkeypatch.setenv("SPARSE_RETRIEVAL_TOPK_RESIDENT", "1")
    rows_and_k(dtype, kind, "cuda")
    gen = torch.Generator().manual_seed(43)
    for shape, k in [((3, 70_001), 2000), ((2, 30_522), 30_522), ((5, 20_000), 1), ((4, 40_000), 256)]:
        x = make(shape, dtype, kind, gen, "cuda")
        check(x, k)
        check(x, k, largest=False, sorted=False)
    for x in (torch.arange(50_000.0), torch.full((50_000,), -0.0), torch.full((50_000,), math.nan)):
        check(x.cuda(), 1000)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("kind", KINDS)
def test_one_read_issue_shapes_on_gpu(monkeypatch, kind):
    """The issue's shapes, rows in waves of resident blocks, and rows of 10^7 that do not fit and take the other
    kernels (no "cuda" in the name: too large for gpu_run.sh's compute-sanitizer runs, which select -k cuda)."""
    monkeypatch.setenv("SPARSE_RETRIEVAL_TOPK_RESIDENT", "1")
    gen = torch.Generator().manual_seed(44)
    for shape, k in [((1, 1_000_003), 100), ((300, 2049), 64), ((256, 262_144), 256), ((2048, 131_072), 1024),
                     ((8192, 30_522), 64), ((1, 10_000_000), 100)]:
        x = make(shape, torch.float32, kind, gen, "cuda")
        check(x, k)
        check(x, k, largest=False, sorted=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_small_k_adversarial_orders():
    """Ascending rows make every element beat the block selection's running threshold (a merge every tile or
    two); constant and NaN rows tie everywhere."""
    for n in (3000, 200_000):
        for x in (torch.arange(n, dtype=torch.float32), torch.arange(n, 0, -1, dtype=torch.float32),
                  torch.full((n,), -0.0), torch.full((n,), math.nan)):
            for k in (1, 100, SMALL_K, SMALL_K + 1):
                check(x.cuda(), k)
                check(x.cuda(), k, largest=False)


# ---- host emulation of the CUDA block selection --------------------------------------------------------------

@pytest.fixture(scope="module")
def select_emulation(tmp_path_factory):
    """tests/topk_select_emulation.cpp: the CUDA block selection's own code (topk_select.h), run on the host thread
    by thread with every phase in a random thread order."""
    return build_emulation(tmp_path_factory, "topk_select_emulation.cpp", "kernels/cuda/topk_select.h")


def run_emulation(exe, x, k, largest, plan_args, seed):
    """Runs an emulated top-k kernel on (rows, n) float32 x: ROWS N K LARGEST *plan_args SEED, the rows on stdin."""
    rows, n = x.shape
    return subprocess.run([str(exe), *map(str, (rows, n, k, int(largest), *plan_args, seed))],
                          input=x.contiguous().numpy().tobytes(), capture_output=True)


def verify_emulated(run, x, k, largest, plan=None):
    """The emulated kernel's indices against the reference, and its plan (the numbers it printed on stderr)."""
    assert run.returncode == 0, (run.returncode, run.stderr.decode())
    indices = torch.frombuffer(bytearray(run.stdout), dtype=torch.int64).reshape(x.shape[0], k)
    assert torch.equal(indices, reference.topk(x, k, largest=largest)[1])
    if plan is not None:
        assert tuple(map(int, run.stderr.split())) == plan


def check_emulated(exe, x, k, largest, plan=None, blocks_wanted=0, min_part=16384, seed=0):
    """The block selection's emulation; plan: (groups per block, parts per row)."""
    verify_emulated(run_emulation(exe, x, k, largest, (blocks_wanted, min_part), seed), x, k, largest, plan)


@pytest.mark.parametrize("kind", KINDS)
def test_select_emulation_plans(select_emulation, kind):
    """Every way a launch covers rows: 8/4/2 rows per block with idle groups, a block per row, rows cut into parts
    (a part shorter than k, an empty last part), with float32 and float16/bfloat16-rounded data."""
    gen = torch.Generator().manual_seed(37)
    cases = [  # rows, n, k, launch args, expected (groups, parts)
        (3, 1, 1, {}, (8, 1)), (11, 200, 37, {}, (8, 1)), (9, 256, 256, {}, (8, 1)), (5, 257, 32, {}, (4, 1)),
        (6, 700, 129, {}, (2, 1)), (3, 1024, 200, {}, (2, 1)), (2, 1025, 64, {}, (1, 1)),
        (2, 5003, 250, {}, (1, 1)), (1, 40_000, 100, {"blocks_wanted": 8}, (1, 2)),
        (2, 5000, 256, {"blocks_wanted": 64, "min_part": 100}, (1, 32)),
        (3, 2050, 17, {"blocks_wanted": 6, "min_part": 300}, (1, 2)),
        (1, 9, 9, {"blocks_wanted": 4, "min_part": 2}, (8, 1)),  # short rows are never split
        (1, 3000, 256, {"blocks_wanted": 1000, "min_part": 2}, (1, 1000)),  # parts of 3 elements, second pass G=1
    ]
    for i, (rows, n, k, args, plan) in enumerate(cases):
        dtype = DTYPES[i % len(DTYPES)]
        x = make((rows, n), dtype, kind, gen).float()
        check_emulated(select_emulation, x, k, i % 2 == 0, plan, seed=i, **args)


def test_select_emulation_every_k(select_emulation):
    """k = 1..256 on rows of ties, NaN, +/-inf and +/-0 (one and two rows per block), both directions."""
    gen = torch.Generator().manual_seed(41)
    x = make((3, 700), torch.float32, "special", gen)
    x[:, ::5] = x[:, 1::5].round()
    y = make((1, 2500), torch.float32, "ties", gen)
    for k in range(1, SMALL_K + 1):
        check_emulated(select_emulation, x, k, k % 2 == 0, seed=k)
        if k % 15 == 0:
            check_emulated(select_emulation, y, k, k % 2 == 1, blocks_wanted=5, min_part=300, seed=k)


def test_select_emulation_adversarial_orders(select_emulation):
    n = 20_000
    for x in (torch.arange(n, dtype=torch.float32), torch.arange(n, 0, -1, dtype=torch.float32),
              torch.full((n,), -0.0), torch.full((n,), math.nan), torch.full((n,), -math.inf)):
        for k in (1, 100, SMALL_K):
            for largest in (True, False):
                check_emulated(select_emulation, x[None], k, largest)
                check_emulated(select_emulation, x[None], k, largest, blocks_wanted=3, min_part=1000)


# ---- host emulation of the CUDA one-read radix select ----------------------------------------------------------

@pytest.fixture(scope="module")
def resident_emulation(tmp_path_factory):
    """tests/topk_resident_emulation.cpp: the one-read radix select's own code (topk_resident.h), every block
    phase in a random thread order and every row stage in a random block order."""
    return build_emulation(tmp_path_factory, "topk_resident_emulation.cpp", "kernels/cuda/topk_resident.h")


def check_resident(exe, x, k, largest, capacity, resident, min_part=4096, seed=0, plan=None):
    """The one-read select's emulation; plan: (parts per row, blocks launched), or "nofit" (the rows do not fit)."""
    run = run_emulation(exe, x, k, largest, (capacity, resident, min_part), seed)
    if plan == "nofit":
        assert run.returncode == 6 and run.stderr.strip() == b"nofit"
    else:
        verify_emulated(run, x, k, largest, plan)


@pytest.mark.parametrize("kind", KINDS)
def test_resident_emulation_plans(resident_emulation, kind):
    """Rows in one part and in several (cut to fill the resident blocks, or because a row exceeds one block's
    codes), waves of rows, parts shorter than a thread's share, k from 1 to n, float16/bfloat16-rounded data."""
    gen = torch.Generator().manual_seed(47)
    cases = [  # rows, n, k, capacity, resident blocks, min part, expected (parts, grid)
        (1, 1, 1, 1024, 8, 4096, (1, 1)), (5, 700, 350, 1024, 4, 4096, (1, 4)),
        (3, 5000, 37, 1024, 16, 256, (5, 15)), (2, 5003, 5003, 1024, 64, 256, (19, 38)),
        (7, 3000, 100, 512, 14, 4096, (6, 12)), (1, 100_000, 1000, 2048, 64, 512, (64, 64)),
        (4, 2049, 2, 4096, 64, 100, (16, 64)), (2, 600, 599, 10, 200, 1, (60, 120)),
        (9, 1000, 1, 100, 20, 1000, (10, 20)),
    ]
    for i, (rows, n, k, capacity, resident, min_part, plan) in enumerate(cases):
        x = make((rows, n), DTYPES[i % len(DTYPES)], kind, gen).float()
        check_resident(resident_emulation, x, k, i % 2 == 0, capacity, resident, min_part, seed=i, plan=plan)


def test_resident_emulation_ties_and_early_stop(resident_emulation):
    """The k-th value's ties ranked across parts (constant, NaN, +/-0 rows; few distinct values), every k on a
    short row, rows whose bucket empties after one digit (early stop), and rows that do not fit."""
    gen = torch.Generator().manual_seed(53)
    n = 6000
    for x in (torch.arange(n, dtype=torch.float32), torch.arange(n, 0, -1, dtype=torch.float32),
              torch.full((n,), -0.0), torch.full((n,), math.nan), torch.full((n,), -math.inf),
              torch.randint(-2, 3, (n,), generator=gen).float(), torch.ldexp(torch.ones(n), torch.arange(n) % 200)):
        for k in (1, 100, 2999, n):
            for largest in (True, False):
                check_resident(resident_emulation, x[None], k, largest, 1024, 32, 500, seed=k)
    x = make((2, 300), torch.float32, "special", gen)
    x[:, ::3] = x[:, 1::3].round()
    for k in range(1, 301, 7):
        check_resident(resident_emulation, x, k, k % 2 == 0, 64, 20, 16, seed=k)
    check_resident(resident_emulation, torch.zeros(1, 65 * 100), 5, True, 100, 1000, 100, plan="nofit")
    check_resident(resident_emulation, torch.zeros(1, 1000), 5, True, 100, 9, 100, plan="nofit")


@pytest.mark.parametrize("kind", KINDS)
def test_long_rows_split_between_threads(simd, kind):
    """Fewer rows than threads: rows are cut into chunks whose candidates are merged."""
    gen = torch.Generator().manual_seed(3)
    old = torch.get_num_threads()
    torch.set_num_threads(max(2, old))
    try:
        x = make((1, 200_003), torch.float32, kind, gen)
        for k in (1, 10, 1000):
            check(x, k)
            check(x, k, largest=False)
        check(make((1, 100_001), torch.bfloat16, kind, gen), 64)
    finally:
        torch.set_num_threads(old)


def test_adversarial_orders(simd):
    """Ascending input makes every element pass the threshold; descending and constant rows are the other
    extremes."""
    n = 5000
    for x in (torch.arange(n, dtype=torch.float32), torch.arange(n, 0, -1, dtype=torch.float32),
              torch.full((n,), 2.0), torch.full((n,), math.nan)):
        for k in (1, 17, 300, n):
            check(x, k)
            check(x, k, largest=False)


@pytest.mark.parametrize("kind", KINDS)
def test_sampled_threshold(simd, kind):
    """Large k on long rows starts from a sampled threshold; ties and NaN make it fail and fall back."""
    gen = torch.Generator().manual_seed(29)
    for dtype in (torch.float32, torch.bfloat16):
        x = make((2, 20_011), dtype, kind, gen)
        for k in (150, 300):
            check(x, k)
            check(x, k, largest=False)


def test_one_million_and_many_rows():
    gen = torch.Generator().manual_seed(5)
    check(make((1, 1_000_000), torch.float32, "special", gen), 100)
    check(make((1024, 300), torch.float16, "ties", gen), 64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_shapes_dims_and_views(device, dtype):
    gen = torch.Generator().manual_seed(7)
    x = make((4, 37, 9), dtype, "special", gen, device)
    for dim in (0, 1, 2, -1, -2):
        check(x, min(3, x.shape[dim]), dim)
    check(x.transpose(0, 2), 3, dim=-1)  # non-contiguous
    check(x[:, ::3, :], 2, dim=1)
    check(x[..., 0], 11, dim=-1, largest=False)
    check(make((), dtype, "randn", gen, device), 1)
    check(make((), dtype, "randn", gen, device), 0)
    check(make((3, 0), dtype, "randn", gen, device), 0)
    check(make((0, 5), dtype, "randn", gen, device), 2)


def test_out_argument():
    x = torch.randn(6, 50)
    values, indices = torch.empty(6, 4), torch.empty(6, 4, dtype=torch.int64)
    got = sr.topk(x, 4, out=(values, indices))
    assert got[0] is values and got[1] is indices
    ref_values, ref_indices = reference.topk(x, 4)
    assert torch.equal(values, ref_values) and torch.equal(indices, ref_indices)
    with pytest.raises(ValueError, match="out values"):
        sr.topk(x, 4, out=(torch.empty(6, 5), indices))
    with pytest.raises(ValueError, match="out indices"):
        sr.topk(x, 4, out=(values, torch.empty(6, 4, dtype=torch.int32)))
    with pytest.raises(TypeError, match="out"):
        sr.topk(x, 4, out=values)
    with pytest.raises(ValueError, match="autograd"):
        sr.topk(x.requires_grad_(), 4, out=(values, indices))


def test_bad_input():
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match="k"):
        sr.topk(x, 11)
    with pytest.raises(ValueError, match="k"):
        sr.topk(x, -1)
    with pytest.raises(TypeError, match="k"):
        sr.topk(x, 2.0)
    with pytest.raises(IndexError, match="dim"):
        sr.topk(x, 1, dim=2)
    for dtype in (torch.int32, torch.int64, torch.complex64, torch.float64, torch.bool):
        with pytest.raises(TypeError, match="dtype"):
            sr.topk(torch.zeros(3, 4, dtype=dtype), 1)
    with pytest.raises(TypeError, match="x"):
        sr.topk([1.0, 2.0], 1)
    # The op itself repeats the checks that guard memory.
    with pytest.raises(ValueError, match="k must lie"):
        torch.ops.sparse_retrieval.topk(x, 11)
    with pytest.raises(TypeError, match="float32"):
        torch.ops.sparse_retrieval.topk(x.int(), 1)
    with pytest.raises(IndexError, match="dim"):
        torch.ops.sparse_retrieval.topk(x, 1, -3)
    with pytest.raises(TypeError, match="x: expected a tensor, got None"):
        torch.ops.sparse_retrieval.topk(None, 1)


def test_opcheck(device):
    gen = torch.Generator().manual_seed(11)
    for x, k, dim, largest, sorted in [
        (make((5, 40), torch.float32, "randn", gen, device), 7, -1, True, True),
        (make((6, 3, 8), torch.bfloat16, "ties", gen, device), 2, 1, False, True),
        (make((9, 20), torch.float16, "randn", gen, device), 20, 1, True, False),
    ]:
        torch.library.opcheck(torch.ops.sparse_retrieval.topk.default,
                              (x.requires_grad_(x.dtype == torch.float32), k, dim, largest, sorted))


def test_topk_gradient(device):
    gen = torch.Generator().manual_seed(13)
    x = make((4, 6, 31), torch.float32, "ties", gen, device).requires_grad_()
    weights = torch.randn(4, 5, 31, generator=gen).to(device)
    (sr.topk(x, 5, dim=1)[0] * weights).sum().backward()
    expected = torch.autograd.grad((reference.topk(x, 5, dim=1)[0] * weights).sum(), x)[0]
    assert torch.equal(x.grad, expected)


# ---- topk_sparsify --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["value", "abs"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparsify_matches_reference(device, simd, by, dtype):
    gen = torch.Generator().manual_seed(17)
    for shape, k in [((8, 300), 32), ((3, 4, 65), 1), ((5, 16), 16), ((2, 10), 50), ((4, 33), 0)]:
        x = make(shape, dtype, "ties", gen, device)
        got = sr.topk_sparsify(x, k, by=by)
        assert torch.equal(got, reference.topk_sparsify(x, k, by=by))


def test_sparsify_gradient():
    gen = torch.Generator().manual_seed(19)
    # Well-separated values so that gradcheck's perturbations cannot change the selection.
    x = (torch.randperm(6 * 20, generator=gen).reshape(6, 20).double() / 10 - 6).requires_grad_()
    for by in ("value", "abs"):
        assert torch.autograd.gradcheck(lambda t: sr.topk_sparsify(t, 5, by=by), (x,))
    # float32 goes through the kernel: the gradient reaches exactly the kept entries.
    xf = torch.randn(16, 200, generator=gen).requires_grad_()
    upstream = torch.randn(16, 200, generator=gen)
    (sr.topk_sparsify(xf, 12) * upstream).sum().backward()
    expected = torch.autograd.grad((reference.topk_sparsify(xf, 12) * upstream).sum(), xf)[0]
    assert torch.equal(xf.grad, expected)
    assert int((xf.grad != 0).sum(1).max()) <= 12


def test_sparsify_as_sparse(device):
    gen = torch.Generator().manual_seed(23)
    x = make((7, 90), torch.float32, "randn", gen, device).requires_grad_()
    batch = sr.topk_sparsify(x, 9, by="abs", as_sparse=True)
    assert isinstance(batch, sr.SparseBatch) and batch.shape == (7, 90) and batch.nnz == 7 * 9
    assert torch.equal(batch.row_nnz(), torch.full((7,), 9, device=device))
    assert bool((batch.indices.view(7, 9).diff(dim=1) > 0).all())
    assert torch.equal(batch.to_dense(), reference.topk_sparsify(x.detach(), 9, by="abs"))
    batch.values.sum().backward()
    assert torch.equal(x.grad, (reference.topk_sparsify(x.detach(), 9, by="abs") != 0).float())


def test_sparsify_bad_input():
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match="by"):
        sr.topk_sparsify(x, 2, by="magnitude")
    with pytest.raises(ValueError, match="k"):
        sr.topk_sparsify(x, -1)
    with pytest.raises(ValueError, match="as_sparse"):
        sr.topk_sparsify(x[None], 2, as_sparse=True)
    with pytest.raises(TypeError, match="dtype"):
        sr.topk_sparsify(x.int(), 2)


@pytest.mark.parametrize("k", [1, 7, 200])
def test_scratch_memory_is_independent_of_the_row_length(k):
    """Small k once took 8 bytes of scratch per element (+512 MiB for a 64M-element row); now O(k + block)."""
    script = f"""
import resource, torch, sparse_retrieval as sr
x = torch.randn(1, 1 << 24).half()  # 32 MiB
torch.set_num_threads(1)
sr.topk(x[:, :4096], {k})  # warm up (libraries, thread-local buffers of short rows)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
values, _ = sr.topk(x, {k})
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
assert torch.equal(values.float(), torch.topk(x.float(), {k}).values)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    grown_kib = int(run.stdout.split()[0])
    assert grown_kib < 8 * 1024, f"peak memory grew by {grown_kib} KiB"
