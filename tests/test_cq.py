"""Coupled quantization: encode/decode and attention-from-codes kernels against sparse_retrieval.reference,
the quantizer's fitting, and bad input."""
import os
import subprocess

import pytest
import torch

import sparse_retrieval as sr
from sparse_retrieval import cq, reference

from conftest import build_emulation

OPS = torch.ops.sparse_retrieval


def random_books(groups, k, g, gen, dtype=torch.float32):
    return torch.randn(groups, k, g, generator=gen).to(dtype)


def assert_nearest(x, books, codes):
    """codes equal the reference, or (float rounding of a near tie) point at a centroid just as close."""
    ref = reference.cq_encode(x, books)
    assert codes.dtype == ref.dtype and codes.shape == ref.shape
    if torch.equal(codes.cpu(), ref):
        return
    groups, _, g = books.shape
    xs = x.float().reshape(-1, groups, 1, g)
    dist = (xs - books.float()[None]).pow(2).sum(-1)  # (rows, groups, K)
    got = dist.gather(2, codes.cpu().reshape(-1, groups, 1).long())
    want = dist.gather(2, ref.reshape(-1, groups, 1).long())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (codes.cpu() != ref).float().mean() < 0.01


@pytest.mark.parametrize("rows,groups,k,g", [(0, 3, 16, 2), (1, 1, 1, 1), (37, 5, 37, 3), (130, 4, 256, 8),
                                             (19, 2, 300, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_encode_decode_match_reference(simd, device, rows, groups, k, g, dtype):
    gen = torch.Generator().manual_seed(rows * 7 + k)
    books = random_books(groups, k, g, gen)
    x = torch.randn(rows, groups * g, generator=gen).to(dtype)
    codes = cq.encode(x.to(device), books.to(device))
    assert codes.dtype == (torch.uint8 if k <= 256 else torch.int16)
    assert_nearest(x, books, codes)
    ref_codes = reference.cq_encode(x, books).to(device)
    for book_dtype in (torch.float32, torch.float16):
        b = books.to(book_dtype).to(device)
        out = cq.decode(ref_codes, b)
        assert out.dtype == book_dtype
        assert torch.equal(out.cpu(), reference.cq_decode(ref_codes.cpu(), b.cpu()))


def test_kernels_see_codebooks_changed_in_place(simd):
    """The kernels keep layouts derived from codebooks per tensor: an in-place change (a new version) or a new
    tensor at the same address must not reuse a stale one."""
    gen = torch.Generator().manual_seed(12)
    books = random_books(3, 16, 4, gen)
    x = torch.randn(40, 12, generator=gen)
    assert torch.equal(cq.encode(x, books), reference.cq_encode(x, books))
    books.mul_(-1.5)
    assert torch.equal(cq.encode(x, books), reference.cq_encode(x, books))
    for _ in range(3):  # fresh tensors, likely at a freed address
        other = random_books(3, 16, 4, gen)
        assert torch.equal(cq.encode(x, other), reference.cq_encode(x, other))
        del other
    q, kc, vc, kq, vq, kr, vr, _ = attention_case(gen, 1, 4, 2, 1, 16, 4, 4, 30, 2)
    cq.attention(q, kc, vc, kq, vq, kr, vr)
    with torch.no_grad():
        kq.codebooks.mul_(2)
        vq.codebooks.add_(1)
    want = reference.cq_attention(q, kc, vc, kq.codebooks, vq.codebooks, kr, vr)
    torch.testing.assert_close(cq.attention(q, kc, vc, kq, vq, kr, vr), want, rtol=1e-4, atol=1e-5)


def test_encode_keeps_leading_dims_and_ties(simd, device):
    gen = torch.Generator().manual_seed(1)
    books = random_books(3, 40, 2, gen)
    books[:, 21] = books[:, 5]  # duplicated centroid: the lower code wins
    books[1] = books[1, 7]  # every centroid of group 1 equal: code 0
    x = books[:, 5].reshape(1, 6).repeat(4, 1).reshape(2, 2, 6)
    codes = cq.encode(x.to(device), books.to(device)).cpu()
    assert codes.shape == (2, 2, 3)
    assert torch.equal(codes, reference.cq_encode(x, books))
    assert (codes[..., 0] == 5).all() and (codes[..., 1] == 0).all() and (codes[..., 2] == 5).all()
    # NaN input: every distance is NaN and the first code is returned, as argmin in the reference.
    nan_x = torch.full((1, 6), float("nan"))
    assert torch.equal(cq.encode(nan_x.to(device), books.to(device)).cpu(), reference.cq_encode(nan_x, books))


ATTENTION_DEVICES = ["cpu"] + (["cuda", "cuda-fused"] if torch.cuda.is_available() else [])


@pytest.fixture(params=ATTENTION_DEVICES)
def attn_device(request, monkeypatch):
    """'cpu', and on a GPU 'cuda' with each CUDA attention kernel: the multi-pass default and the fused one
    (SPARSE_RETRIEVAL_CQ_FUSED=1). Returns the torch device."""
    if request.param == "cuda-fused":
        monkeypatch.setenv("SPARSE_RETRIEVAL_CQ_FUSED", "1")
    else:
        monkeypatch.delenv("SPARSE_RETRIEVAL_CQ_FUSED", raising=False)
    return request.param.split("-")[0]


def attention_case(gen, B, Hq, Hkv, Tq, D, g, bits, T, W, lengths=None, dtype=torch.float32):
    K = 2 ** bits
    code_dtype = reference.cq_code_dtype(K)
    kq, vq = (cq.CoupledQuantizer(Hkv * D, g, bits) for _ in range(2))
    for qz in (kq, vq):
        qz.codebooks.copy_(torch.randn(qz.codebooks.shape, generator=gen))
        qz.fitted.fill_(True)
    q = torch.randn(B, Hq, Tq, D, generator=gen).to(dtype)
    kc = torch.randint(0, K, (B, Hkv, T, D // g), generator=gen).to(code_dtype)
    vc = torch.randint(0, K, (B, Hkv, T, D // g), generator=gen).to(code_dtype)
    kr = torch.randn(B, Hkv, W, D, generator=gen).to(dtype) if W else None
    vr = torch.randn(B, Hkv, W, D, generator=gen).to(dtype) if W else None
    return q, kc, vc, kq, vq, kr, vr, lengths


@pytest.mark.parametrize("B,Hq,Hkv,Tq,D,g,bits,T,W,lengths", [
    (2, 4, 2, 1, 16, 4, 8, 53, 0, None),  # no window, GQA
    (3, 6, 2, 2, 16, 2, 5, 41, 7, [41, 0, 13]),  # window, varying lengths, a sequence with no coded token
    (1, 3, 3, 3, 12, 3, 9, 17, 2, None),  # int16 codes, more queries than window slots
    (2, 2, 1, 1, 8, 8, 3, 0, 5, None),  # nothing coded yet
    (1, 1, 1, 1, 8, 4, 4, 30, 0, [0]),  # sees nothing: zeros
    (2, 8, 2, 1, 16, 8, 8, 37, 3, [37, 20]),  # 4 rows per kv head
    (1, 8, 1, 1, 8, 2, 6, 21, 1, None),  # 8 rows
    (1, 9, 1, 2, 8, 4, 7, 26, 4, None),  # 18 rows: generic path
    (2, 8, 2, 1, 32, 8, 8, 3000, 16, [3000, 1700]),  # CUDA: context splits, tiles, running-maximum rescales
    (1, 2, 1, 1, 4, 2, 14, 40, 2, None),  # CUDA: tables beyond shared memory -> the multi-pass kernels
    (2, 8, 2, 1, 128, 8, 8, 1500, 16, [1500, 900]),  # Llama-3 1-bit shapes: 16-byte codes read as vectors
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_matches_reference(simd, attn_device, B, Hq, Hkv, Tq, D, g, bits, T, W, lengths, dtype):
    device = attn_device
    gen = torch.Generator().manual_seed(B * 100 + T)
    lengths = None if lengths is None else torch.tensor(lengths)
    q, kc, vc, kq, vq, kr, vr, lengths = attention_case(gen, B, Hq, Hkv, Tq, D, g, bits, T, W, lengths, dtype)
    want = reference.cq_attention(q, kc, vc, kq.codebooks, vq.codebooks, kr, vr, lengths, scale=0.3)
    dev = [None if t is None else t.to(device) for t in (q, kc, vc, kr, vr, lengths)]
    got = cq.attention(dev[0], dev[1], dev[2], kq.to(device), vq.to(device), dev[3], dev[4], dev[5], scale=0.3)
    assert got.dtype == torch.float32 and got.shape == (B, Hq, Tq, D)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("Tq,W", [(1, 0), (1, 5), (3, 4), (2, 1)])
def test_attention_with_starts_matches_reference(simd, attn_device, Tq, W):
    """starts (left padding, sliding windows): starts anywhere in the coded part, in the window, past a query's
    own position (it sees nothing: zeros), together with lengths. CUDA: the fused kernel only."""
    device = attn_device
    B, Hq, Hkv, D, T = 5, 4, 2, 16, 23
    gen = torch.Generator().manual_seed(40 + Tq * 7 + W)
    q, kc, vc, kq, vq, kr, vr, _ = attention_case(gen, B, Hq, Hkv, Tq, D, 4, 5, T, W)
    lengths = torch.tensor([23, 17, 0, 23, 9])
    starts = torch.randint(0, T + W + 1, (B, Tq), generator=gen)
    starts[0] = 0
    starts[1, 0] = T + W  # past every position
    starts[3] = T + max(W - 1, 0)  # inside the window (or at its end)
    want = reference.cq_attention(q, kc, vc, kq.codebooks, vq.codebooks, kr, vr, lengths, scale=0.4, starts=starts)
    dev = [None if t is None else t.to(device) for t in (q, kc, vc, kr, vr, lengths, starts.int())]
    if device == "cuda" and os.environ.get("SPARSE_RETRIEVAL_CQ_FUSED") != "1":
        with pytest.raises(NotImplementedError, match="SPARSE_RETRIEVAL_CQ_FUSED=1"):
            cq.attention(dev[0], dev[1], dev[2], kq.to(device), vq.to(device), *dev[3:6], starts=dev[6])
        return
    got = cq.attention(dev[0], dev[1], dev[2], kq.to(device), vq.to(device), *dev[3:6], scale=0.4,
                       starts=dev[6]).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(got[1, :, 0], torch.zeros(Hq, D))
    with pytest.raises(ValueError, match="starts must lie in"):
        cq.attention(q, kc, vc, kq, vq, kr, vr, starts=starts + T + W + 1)
    with pytest.raises(ValueError, match="starts must have shape"):
        cq.attention(q, kc, vc, kq, vq, kr, vr, starts=starts[:, :1].repeat(1, Tq + 1))
    with pytest.raises(TypeError, match="starts must be an int64"):
        cq.attention(q, kc, vc, kq, vq, kr, vr, starts=starts.float())
    for bad, match in ((starts - T - W - 1, "starts must lie in"), (starts[:1], "starts must have shape"),
                       (starts.float(), "starts must be int64")):
        with pytest.raises((ValueError, TypeError), match=match):  # the raw op checks too
            OPS.cq_attention(q, kc, vc, kq.codebooks, vq.codebooks, kr, vr, None, None, bad)


# ---- host emulation of the fused CUDA attention ---------------------------------------------------------------


@pytest.fixture(scope="module")
def fused_emulation(tmp_path_factory):
    """tests/cq_fused_emulation.cpp: the fused CUDA attention's own plan and block phases (cq_fused.h), run on the
    host thread by thread with every phase in a random thread order."""
    return build_emulation(tmp_path_factory, "cq_fused_emulation.cpp", "kernels/cuda/cq_fused.h")


def emulate_attention(exe, case, starts, scale, threads, shared_limit, blocks_wanted, min_split, seed):
    """Output of the emulated fused kernel, and its plan (rows per block, chunks, splits, channels per thread)."""
    q, kc, vc, kq, vq, kr, vr, lengths = case
    B, Hq, Tq, D = q.shape
    Hkv, T, G = kc.shape[1:]
    K, g = kq.codebooks.shape[1:]
    W = 0 if kr is None else kr.shape[2]
    lengths = torch.full((B,), T) if lengths is None else lengths
    parts = [q.float(), kc, vc, kq.codebooks, vq.codebooks] + ([kr.float(), vr.float()] if W else [])
    parts += [lengths.long()] + ([starts.long()] if starts is not None else [])
    data = b"".join(t.contiguous().numpy().tobytes() for t in parts)
    args = [kc.element_size(), B, Hq, Hkv, Tq, D, g, K, T, W, scale, int(starts is not None), threads, shared_limit,
            blocks_wanted, min_split, seed]
    run = subprocess.run([str(exe), *map(str, args)], input=data, capture_output=True)
    assert run.returncode == 0, run.stderr.decode()
    plan = tuple(map(int, run.stderr.split()))
    return torch.frombuffer(bytearray(run.stdout), dtype=torch.float32).reshape(B, Hq, Tq, D), plan


BIG = 1 << 30  # shared memory without limit


@pytest.mark.parametrize("B,Hq,Hkv,Tq,D,g,bits,T,W,lengths,with_starts,threads,shared,blocks,min_split,plan", [
    (2, 8, 2, 1, 16, 8, 8, 300, 4, [300, 120], False, 32, 21000, 64, 16, (2, 2, 8, 4, 0)),  # 2-row chunks, splits
    (1, 32, 8, 1, 32, 8, 8, 1000, 16, None, False, 64, BIG, 1, 64, (4, 1, 1, 4, 0)),  # Llama-like 4 rows, many tiles
    (3, 6, 2, 2, 16, 2, 5, 41, 7, [41, 0, 13], True, 32, BIG, 24, 8, (6, 1, 4, 1, 0)),  # starts, causal rows
    (1, 3, 3, 3, 12, 3, 9, 77, 2, None, True, 32, 42000, 9, 8, (2, 2, 2, 1, 0)),  # int16 codes, unequal chunks
    (2, 2, 1, 1, 8, 8, 3, 0, 5, None, False, 32, BIG, 8, 8, (2, 1, 1, 4, 0)),  # nothing coded
    (1, 1, 1, 1, 8, 4, 4, 30, 0, [0], False, 32, BIG, 8, 8, (1, 1, 4, 4, 0)),  # sees nothing: zeros
    (1, 4, 1, 4, 16, 4, 4, 97, 6, [90], True, 32, 2000, 200, 4, (1, 16, 13, 4, 0)),  # 16 chunks of one row
    (1, 16, 1, 1, 16, 4, 6, 200, 0, None, False, 32, BIG, 8, 8, (8, 2, 4, 4, 0)),  # 8 rows per block (the most)
    (1, 4, 1, 1, 16, 1, 4, 1100, 3, None, False, 64, BIG, 4, 64, (4, 1, 4, 1, 1)),  # 16-byte codes, prefetched
    (2, 8, 2, 1, 32, 1, 3, 700, 0, [700, 333], True, 32, BIG, 16, 64, (4, 1, 4, 1, 2)),  # 32-byte codes, starts
])
def test_fused_emulation_matches_reference(fused_emulation, B, Hq, Hkv, Tq, D, g, bits, T, W, lengths, with_starts,
                                           threads, shared, blocks, min_split, plan):
    gen = torch.Generator().manual_seed(T * 3 + Tq)
    case = attention_case(gen, B, Hq, Hkv, Tq, D, g, bits, T, W, None if lengths is None else torch.tensor(lengths))
    q, kc, vc, kq, vq, kr, vr, lens = case
    starts = torch.randint(0, T + W + 1, (B, Tq), generator=gen) if with_starts else None
    want = reference.cq_attention(q, kc, vc, kq.codebooks, vq.codebooks, kr, vr, lens, scale=0.3, starts=starts)
    for seed in range(2):
        got, got_plan = emulate_attention(fused_emulation, case, starts, 0.3, threads, shared, blocks, min_split,
                                          seed)
        assert got_plan == plan, got_plan
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_attention_compiles_fullgraph():
    """cq.attention under torch.compile(fullgraph=True): no graph break, the eager result, and bad lengths still
    raise (the op checks them at run time)."""
    gen = torch.Generator().manual_seed(13)
    q, kc, vc, kq, vq, kr, vr, _ = attention_case(gen, 2, 4, 2, 1, 16, 8, 8, 40, 4)
    lengths = torch.tensor([40, 25])
    fn = torch.compile(lambda q, kc, vc, kr, vr, lengths: cq.attention(q, kc, vc, kq, vq, kr, vr, lengths),
                       fullgraph=True)
    torch.testing.assert_close(fn(q, kc, vc, kr, vr, lengths), cq.attention(q, kc, vc, kq, vq, kr, vr, lengths))
    with pytest.raises(ValueError, match="lengths must lie in"):
        fn(q, kc, vc, kr, vr, torch.tensor([41, 0]))


def test_attention_codes_inside_larger_buffer(simd):
    gen = torch.Generator().manual_seed(5)
    q, kc, vc, kq, vq, kr, vr, _ = attention_case(gen, 2, 4, 2, 1, 16, 4, 8, 70, 3)
    k_view, v_view = kc[:, :, :45], vc[:, :, :45]  # what a cache with spare capacity passes
    want = reference.cq_attention(q, k_view, v_view, kq.codebooks, vq.codebooks, kr, vr)
    torch.testing.assert_close(cq.attention(q, k_view, v_view, kq, vq, kr, vr), want, rtol=1e-4, atol=1e-5)


def test_opcheck(attn_device):
    device = attn_device
    gen = torch.Generator().manual_seed(3)
    books = random_books(3, 20, 4, gen).to(device)
    x = torch.randn(9, 12, generator=gen).to(device)
    codes = OPS.cq_encode(x, books)
    torch.library.opcheck(OPS.cq_encode, (x, books))
    torch.library.opcheck(OPS.cq_decode, (codes, books))
    q, kc, vc, kq, vq, kr, vr, lengths = attention_case(gen, 2, 4, 2, 2, 8, 2, 4, 11, 3, torch.tensor([11, 4]))
    args = [t.to(device) for t in (q, kc, vc, kq.codebooks, vq.codebooks, kr, vr, lengths)]
    torch.library.opcheck(OPS.cq_attention, (*args, 0.5))
    torch.library.opcheck(OPS.cq_attention, (*args[:5], None, None, None, None))
    if device == "cpu" or os.environ.get("SPARSE_RETRIEVAL_CQ_FUSED") == "1":  # starts: CPU and the fused kernel
        torch.library.opcheck(OPS.cq_attention, (*args, 0.5, torch.tensor([[0, 3], [2, 2]], device=device)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_attention_cuda_fused_equals_multipass(monkeypatch):
    """SPARSE_RETRIEVAL_CQ_FUSED=1 selects the fused kernel: same result as the multi-pass default (which cannot
    honour starts)."""
    gen = torch.Generator().manual_seed(8)
    case = attention_case(gen, 3, 8, 2, 2, 64, 8, 8, 2000, 8, torch.tensor([2000, 777, 1]))
    q, kc, vc, kq, vq, kr, vr, lengths = [t.cuda() for t in case]
    monkeypatch.setenv("SPARSE_RETRIEVAL_CQ_FUSED", "1")
    fused = cq.attention(q, kc, vc, kq, vq, kr, vr, lengths)
    monkeypatch.delenv("SPARSE_RETRIEVAL_CQ_FUSED")
    torch.testing.assert_close(cq.attention(q, kc, vc, kq, vq, kr, vr, lengths), fused, rtol=1e-4, atol=1e-5)
    with pytest.raises(NotImplementedError, match="needs the fused kernel"):
        cq.attention(q, kc, vc, kq, vq, kr, vr, lengths, starts=torch.zeros(3, 2, dtype=torch.long, device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("fused", ["0", "1"])
def test_attention_cuda_graph_capture(monkeypatch, fused):
    """A decode step captured in a CUDA graph (no host synchronisation inside) replays the eager result."""
    monkeypatch.setenv("SPARSE_RETRIEVAL_CQ_FUSED", fused)
    gen = torch.Generator().manual_seed(9)
    q, kc, vc, kq, vq, kr, vr = [t.cuda() for t in attention_case(gen, 2, 8, 2, 1, 128, 8, 8, 3000, 16)[:7]]
    q = q.half()
    want = cq.attention(q, kc, vc, kq, vq, kr, vr)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cq.attention(q, kc, vc, kq, vq, kr, vr)
    q.copy_(torch.randn(q.shape, generator=gen).half())
    graph.replay()
    torch.testing.assert_close(out, cq.attention(q, kc, vc, kq, vq, kr, vr), rtol=1e-4, atol=1e-5)
    assert not torch.equal(out, want)


# ---- the quantizer ---------------------------------------------------------------------------------------------


def test_fit_matches_reference_kmeans_and_is_deterministic():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(300, 12, generator=gen)
    w = torch.rand(300, 3, generator=gen)
    qz = cq.CoupledQuantizer(12, 4, 4, seed=7).fit(x, w, iters=6, progress=False)
    for j in range(3):
        want = reference.kmeans(x[:, 4 * j:4 * j + 4], 16, iters=6, weights=w[:, j], seed=7 + j)
        torch.testing.assert_close(qz.codebooks[j], want, rtol=1e-5, atol=1e-5)
    again = cq.CoupledQuantizer(12, 4, 4, seed=7).fit(x, w, iters=6, progress=False)
    assert torch.equal(qz.codebooks, again.codebooks)
    other = cq.CoupledQuantizer(12, 4, 4, seed=8).fit(x, w, iters=6, progress=False)
    assert not torch.equal(qz.codebooks, other.codebooks)


def test_fit_learns_structure_and_round_trips_state(device, tmp_path):
    gen = torch.Generator().manual_seed(2)
    centers = torch.randn(8, 16, generator=gen) * 5
    x = (centers[torch.randint(0, 8, (2000,), generator=gen)] + 0.01 * torch.randn(2000, 16, generator=gen))
    qz = cq.CoupledQuantizer(16, 8, 3).to(device).fit(x.to(device), progress=False)
    x_hat = qz.decode(qz.encode(x.to(device)))
    assert x_hat.shape == x.shape and x_hat.dtype == torch.float32
    assert ((x_hat.cpu() - x).norm() / x.norm()) < 0.01  # 8 well-separated clusters, 8 centroids each group
    torch.save(qz.state_dict(), tmp_path / "cq.pt")
    restored = cq.CoupledQuantizer(16, 8, 3).to(device)
    restored.load_state_dict(torch.load(tmp_path / "cq.pt"))
    assert torch.equal(restored.encode(x.to(device)), qz.encode(x.to(device)))
    assert qz.bits_per_channel == 3 / 8 and qz.code_dtype == torch.uint8


def test_fit_subsamples_init_and_stops_early():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(700, 4, generator=gen)
    qz = cq.CoupledQuantizer(4, 2, 3).fit(x, init_sample=2, init="random", iters=50, progress=False)
    assert torch.isfinite(qz.codebooks).all()
    codes = qz.encode(x).long()
    # Converged: every centroid is the mean of its rows.
    for j in range(2):
        for c in codes[:, j].unique():
            torch.testing.assert_close(qz.codebooks[j, c], x[codes[:, j] == c, 2 * j:2 * j + 2].mean(0),
                                       rtol=1e-4, atol=1e-5)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="group_size 3 does not divide channels 8"):
        cq.CoupledQuantizer(8, 3, 4)
    for bits in (0, 16):
        with pytest.raises(ValueError, match="bits must be in"):
            cq.CoupledQuantizer(8, 2, bits)
    qz = cq.CoupledQuantizer(8, 2, 4)
    with pytest.raises(RuntimeError, match="not fitted"):
        qz.encode(torch.randn(3, 8))
    with pytest.raises(RuntimeError, match="not fitted"):
        cq.attention(torch.randn(1, 1, 1, 8), torch.zeros(1, 1, 2, 4, dtype=torch.uint8),
                     torch.zeros(1, 1, 2, 4, dtype=torch.uint8), qz, qz)
    x = torch.randn(50, 8)
    with pytest.raises(ValueError, match="weights must have shape"):
        qz.fit(x, torch.ones(50, 3), progress=False)
    with pytest.raises(ValueError, match="8 channels"):
        qz.fit(torch.randn(50, 6), progress=False)
    qz.fit(x, iters=2, progress=False)
    qz.encode(x)
    qz.fitted.fill_(False)  # the flag is remembered without reading it each call, but not past a change
    with pytest.raises(RuntimeError, match="not fitted"):
        qz.encode(x)
    qz.fitted.fill_(True)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        qz.encode(x.double())
    with pytest.raises(TypeError, match="must be torch.uint8"):
        qz.decode(torch.zeros(2, 4, dtype=torch.int16))
    with pytest.raises(IndexError, match=r"must lie in \[0, 16\)"):
        qz.decode(torch.full((2, 4), 16, dtype=torch.uint8))
    with pytest.raises(IndexError, match=r"must lie in \[0, 16\)"):  # the op itself checks too
        OPS.cq_decode(torch.full((2, 4), 200, dtype=torch.uint8), qz.codebooks)
    with pytest.raises(ValueError, match="4 groups"):
        qz.decode(torch.zeros(2, 3, dtype=torch.uint8))
    big = cq.CoupledQuantizer(8, 2, 9).fit(x, iters=1, progress=False)
    with pytest.raises(IndexError, match=r"must lie in \[0, 512\)"):
        big.decode(torch.full((1, 4), -1, dtype=torch.int16))
    q = torch.randn(1, 2, 1, 4)
    codes = torch.zeros(1, 2, 3, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="lengths must lie in"):
        cq.attention(q, codes, codes, qz, qz, lengths=torch.tensor([4]))
    with pytest.raises(ValueError, match="both k_recent and v_recent"):
        cq.attention(q, codes, codes, qz, qz, k_recent=torch.randn(1, 2, 1, 4))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        cq.attention(torch.randn(1, 3, 1, 4), codes, codes, qz, qz)
    with pytest.raises(TypeError, match="must be torch.uint8"):
        cq.attention(q, codes.short(), codes.short(), qz, qz)
    with pytest.raises(IndexError, match="k_codes must lie"):  # the op checks code range
        OPS.cq_attention(q, codes + 16, codes, qz.codebooks, qz.codebooks)



def test_raw_ops_refuse_none_non_finite_codebooks_and_bad_fake_shapes():
    books = torch.randn(4, 16, 2)
    x = torch.randn(3, 8)
    with pytest.raises(TypeError, match="x: expected a tensor, got None"):
        OPS.cq_encode(None, books)
    with pytest.raises(TypeError, match="codebooks: expected a tensor, got None"):
        OPS.cq_encode(x, None)
    with pytest.raises(TypeError, match="codes: expected a tensor, got None"):
        OPS.cq_decode(None, books)
    codes = torch.zeros(1, 1, 2, 4, dtype=torch.uint8)
    with pytest.raises(TypeError, match="k_codes: expected a tensor, got None"):
        OPS.cq_attention(torch.randn(1, 1, 1, 8), None, codes, books, books)
    for bad in (float("nan"), float("inf")):  # distances to such a centroid make the nearest one arbitrary
        damaged = books.clone()
        damaged[1, 3, 0] = bad
        with pytest.raises(ValueError, match="codebooks: centroids must be finite"):
            OPS.cq_encode(x, damaged)
    meta = torch.device("meta")
    with pytest.raises(ValueError, match="8 channels"):
        OPS.cq_encode(torch.zeros(3, 7, device=meta), books.to(meta))
    with pytest.raises(ValueError, match="4 groups"):
        OPS.cq_decode(torch.zeros(3, 5, dtype=torch.uint8, device=meta), books.to(meta))


def test_encode_after_a_reshape_behind_the_version_counter():
    """`t.data = ...` changes a tensor's shape without a new version: the codebook layout cached for the old shape
    must not serve the new one (it read past its buffer)."""
    gen = torch.Generator().manual_seed(5)
    books = torch.randn(1, 16, 2, generator=gen)
    OPS.cq_encode(torch.randn(3, 2, generator=gen), books)
    books.data = books.data.view(16, 1, 2)  # 16 groups of one centroid: every code is 0
    x = torch.randn(2, 32, generator=gen)
    assert OPS.cq_encode(x, books).eq(0).all()
    torch.testing.assert_close(OPS.cq_encode(x, books), reference.cq_encode(x, books))


def test_attention_refuses_what_it_cannot_define():
    """An infinite centroid (even an unused one), a scale that is not a finite number, inputs on two devices
    (a meta tensor once sent the call to the fake and returned uninitialised memory)."""
    x = torch.randn(60, 8)
    qz = cq.CoupledQuantizer(8, 2, 4).fit(x, iters=1, progress=False)
    q = torch.randn(1, 2, 1, 4)
    codes = torch.zeros(1, 2, 3, 2, dtype=torch.uint8)  # only centroid 0 used
    OPS.cq_attention(q, codes, codes, qz.codebooks, qz.codebooks)
    books = qz.codebooks.clone()
    books[0, 5, 1] = float("inf")
    with pytest.raises(ValueError, match="centroids must be finite"):
        OPS.cq_attention(q, codes, codes, qz.codebooks, books)
    qz.codebooks[0, 5, 1] = float("-inf")  # in place, after a call that checked it
    with pytest.raises(ValueError, match="centroids must be finite"):
        cq.attention(q, codes, codes, qz, qz)
    qz.codebooks[0, 5, 1] = 0.0
    for scale in ("x", float("nan"), True):
        with pytest.raises(TypeError, match="scale"):
            cq.attention(q, codes, codes, qz, qz, scale=scale)
    with pytest.raises(ValueError, match="scale must be finite"):
        OPS.cq_attention(q, codes, codes, qz.codebooks, qz.codebooks, scale=float("inf"))
    with pytest.raises(ValueError, match="one device"):
        OPS.cq_attention(q, codes, codes, qz.codebooks, qz.codebooks.to("meta"))
    with pytest.raises(ValueError, match="one device"):
        OPS.cq_decode(codes[0, 0], qz.codebooks.to("meta"))
    with pytest.raises(ValueError, match="one device"):
        OPS.sparse_dot(torch.tensor([0, 1]), torch.tensor([0]), torch.ones(1, device="meta"), torch.tensor([0, 1]),
                       torch.tensor([0]), torch.ones(1), 4)
    meta = OPS.cq_attention(q.to("meta"), codes.to("meta"), codes.to("meta"), qz.codebooks.to("meta"),
                            qz.codebooks.to("meta"))
    assert meta.device.type == "meta" and meta.shape == q.shape


def test_importable():
    import sparse_retrieval.cq as module

    assert module is sr.cq and callable(sr.cq.attention)
