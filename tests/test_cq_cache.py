"""CoupledQuantizedCache and calibrate on a tiny randomly initialised transformers Llama (no downloads)."""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from sparse_retrieval import cq  # noqa: E402
from sparse_retrieval.cq import cache as cache_module  # noqa: E402
from sparse_retrieval.cq.cache import CoupledQuantizedCache, calibrate, enable_cq_attention  # noqa: E402

HKV, HEAD_DIM = 2, 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=HKV, head_dim=HEAD_DIM,
                         max_position_embeddings=256, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def texts():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 97, (n,), generator=gen) for n in (40, 33, 57)]


@pytest.fixture(scope="module")
def quantizers(model, texts):
    return calibrate(model, texts, group_size=4, bits=8, iters=5, progress=False)


def test_calibrate_returns_fitted_quantizers(model, texts, quantizers):
    assert len(quantizers) == 2
    for kq, vq in quantizers:
        assert kq.channels == vq.channels == HKV * HEAD_DIM and kq.bits == 8 and bool(kq.fitted)
    fisher = calibrate(model, texts[:2], group_size=4, bits=4, fisher=True, iters=3, progress=False)
    plain = calibrate(model, texts[:2], group_size=4, bits=4, iters=3, progress=False)
    assert not torch.equal(fisher[0][0].codebooks, plain[0][0].codebooks)  # the weights change the fit
    pre = calibrate(model, texts[:2], group_size=4, bits=4, rope="pre", iters=3, progress=False)
    assert not torch.equal(pre[1][0].codebooks, plain[1][0].codebooks)
    assert torch.equal(pre[1][1].codebooks, plain[1][1].codebooks)  # values do not rotate


def test_window_bookkeeping_and_bytes_per_token(model, quantizers):
    cache = CoupledQuantizedCache(quantizers, window=8)
    ids = torch.randint(0, 97, (3, 13))
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        layer = cache.layers[0]
        assert layer.n_coded == 5 and layer.keys.shape == (3, HKV, 8, HEAD_DIM)
        assert cache.get_seq_length() == 13
        nxt = out.logits[:, -1:].argmax(-1)
        for step in range(1, 4):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            assert layer.n_coded == 5 + step and layer.keys.shape[2] == 8
    assert cache.get_seq_length() == 16
    # The coded tokens cost exactly bits / group_size bits per channel, keys and values, per layer.
    n_layers, channels = 2, HKV * HEAD_DIM
    bits = cache.nbytes()["codes"] * 8
    assert bits == n_layers * 2 * 3 * layer.n_coded * channels * 8 / 4
    assert cache.nbytes()["window"] == n_layers * 2 * 3 * 8 * channels * 4


def test_history_is_coded_once(model, quantizers):
    cache = CoupledQuantizedCache(quantizers, window=4)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        first = cache.layers[1].k_codes.clone()
        model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
    assert torch.equal(cache.layers[1].k_codes[:, :, :first.shape[2]], first)


def test_large_window_equals_full_precision(model, quantizers):
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        want = model(input_ids=ids, past_key_values=DynamicCache(config=model.config)).logits
        got = model(input_ids=ids, past_key_values=CoupledQuantizedCache(quantizers, window=64)).logits
    torch.testing.assert_close(got, want)


def test_generate_and_codes_attention_match_dequantized(model, quantizers):
    ids = torch.randint(0, 97, (2, 11))
    gen_kwargs = dict(max_new_tokens=12, do_sample=False, min_new_tokens=12)
    with torch.no_grad():
        plain = model.generate(ids, past_key_values=CoupledQuantizedCache(quantizers, window=6), **gen_kwargs)
        assert plain.shape == (2, 23)
        # Decode-step logits with attention from codes equal those over the dequantized history.
        logits = []
        for codes_attention in (False, True):
            cache = CoupledQuantizedCache(quantizers, window=6, codes_attention=codes_attention,
                                          model=model if codes_attention else None)
            try:
                model(input_ids=ids, past_key_values=cache, use_cache=True)
                steps = [model(input_ids=plain[:, 11 + i:12 + i], past_key_values=cache, use_cache=True).logits
                         for i in range(5)]
            finally:
                model.set_attn_implementation("sdpa")
            logits.append(torch.cat(steps, 1))
        torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
        try:
            fast = model.generate(ids, past_key_values=CoupledQuantizedCache(quantizers, window=6,
                                                                             codes_attention=True, model=model),
                                  **gen_kwargs)
        finally:
            model.set_attn_implementation("sdpa")
    assert fast.shape == plain.shape


def test_codes_attention_never_silently_drops_the_history(model, quantizers):
    """codes_attention=True hands attention the window only: without the "cq" attention reading the codes the
    history would be ignored (a wrong answer, no error). The cache needs the model, and refuses to go on when the
    model's attention was switched back."""
    ids = torch.randint(0, 97, (1, 11))
    with pytest.raises(ValueError, match="pass model="):
        CoupledQuantizedCache(quantizers, window=6, codes_attention=True)
    cache = CoupledQuantizedCache(quantizers, window=6, codes_attention=True, model=model)
    model.set_attn_implementation("sdpa")  # undoes what the cache switched on
    with torch.no_grad(), pytest.raises(RuntimeError, match="did not read the coded history"):
        model.generate(ids, past_key_values=cache, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    enable_cq_attention(model)
    try:
        with torch.no_grad():
            out = model.generate(ids, past_key_values=CoupledQuantizedCache(quantizers, window=6,
                                                                            codes_attention=True, model=model),
                                 max_new_tokens=4, min_new_tokens=4, do_sample=False)
    finally:
        model.set_attn_implementation("sdpa")
    assert out.shape == (1, 15)


def test_pre_rope_mode_rerotates_history(model, texts):
    # Layer 0's pre-RoPE keys depend on the token only: with one channel per group and more centroids than
    # distinct calibration values, coding calibration text is lossless, which isolates the un-rotate / re-rotate
    # bookkeeping (a wrong position would rotate by the wrong angle).
    pre = calibrate(model, texts, group_size=1, bits=10, rope="pre", iters=3, progress=False)
    ids = texts[2][None, :14]
    full = DynamicCache(config=model.config)
    cache = CoupledQuantizedCache(pre, window=3, rotary_emb=model.model.rotary_emb)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=full, use_cache=True)
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    hist_k, hist_v = cache.layers[0].dequantized()
    want_k = full.layers[0].keys[:, :, :11]
    scale = want_k.abs().max()
    assert (hist_k - want_k).abs().max() < 1e-4 * scale
    assert (hist_v - full.layers[0].values[:, :, :11]).abs().max() < 1e-4 * full.layers[0].values.abs().max()


def test_cache_bad_input(model, quantizers):
    with pytest.raises(ValueError, match="window"):
        CoupledQuantizedCache(quantizers, window=-1)
    with pytest.raises(RuntimeError, match="not fitted"):
        CoupledQuantizedCache([(cq.CoupledQuantizer(32, 4, 4), cq.CoupledQuantizer(32, 4, 4))])
    wrong = [(cq.CoupledQuantizer(16, 4, 2).fit(torch.randn(20, 16), progress=False),) * 2] * 2
    with pytest.raises(ValueError, match="channels"):
        with torch.no_grad():
            model(input_ids=torch.randint(0, 97, (1, 5)), past_key_values=CoupledQuantizedCache(wrong, window=2))


def test_beam_search_reorders_codes(model, quantizers):
    """Beam search against a plain cache that stores decode(encode(x)) for tokens leaving the window: coding is
    per token, so both caches feed attention the same values if the codes follow the beams."""
    from transformers.cache_utils import Cache, DynamicLayer

    window = 4

    class SimulatedLayer(DynamicLayer):
        def __init__(self, kq, vq):
            super().__init__()
            self.kq, self.vq, self.n_coded = kq, vq, 0

        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = super().update(key_states, value_states)
            # As CoupledQuantizedCache: a chunk longer than the window attends in full precision.
            returned = (keys.clone(), values.clone()) if key_states.shape[2] > window else (keys, values)
            end = keys.shape[2] - window
            if end > self.n_coded:
                for x, qz in ((keys, self.kq), (values, self.vq)):
                    part = x[:, :, self.n_coded:end]
                    B, H, n, D = part.shape
                    tokens = part.transpose(1, 2).reshape(B, n, H * D)
                    x[:, :, self.n_coded:end] = qz.decode(qz.encode(tokens)).reshape(B, n, H, D).transpose(1, 2)
                self.n_coded = end
            return returned

    ids = torch.randint(0, 97, (2, 9))
    kwargs = dict(num_beams=3, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                  attention_mask=torch.ones_like(ids), pad_token_id=0)
    with torch.no_grad():
        got = model.generate(ids, past_key_values=CoupledQuantizedCache(quantizers, window=window), **kwargs)
        want = model.generate(ids, past_key_values=Cache(layers=[SimulatedLayer(k, v) for k, v in quantizers]),
                              **kwargs)
    assert torch.equal(got, want)


class SimulatedCQCache(DynamicCache):
    """What a per-token quantizing cache returns: the history in full precision at a prefill longer than the
    window, afterwards every token older than the last `window` quantized and dequantized."""

    def __init__(self, quantizers, window):
        super().__init__()
        self.quantizers, self.window = quantizers, window

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        old = keys.shape[2] - self.window
        if key_states.shape[2] > self.window or old <= 0:
            return keys, values
        kq, vq = self.quantizers[layer_idx]

        def qdq(q, x):
            B, H, n, D = x.shape
            y = q.decode(q.encode(x.transpose(1, 2).reshape(B, n, H * D)))
            return y.reshape(B, n, H, D).transpose(1, 2).to(x.dtype)

        return (torch.cat([qdq(kq, keys[:, :, :old]), keys[:, :, old:]], 2),
                torch.cat([qdq(vq, values[:, :, :old]), values[:, :, old:]], 2))


def _tiny(arch):
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  max_position_embeddings=256, attn_implementation="sdpa")
    if arch == "qwen3":  # query and key norms
        from transformers import Qwen3Config, Qwen3ForCausalLM
        return Qwen3ForCausalLM(Qwen3Config(num_hidden_layers=2, num_key_value_heads=2, head_dim=16, **common))
    if arch == "gemma3":  # sliding and global layers, one KV head, head_dim 256
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig
        return Gemma3ForCausalLM(Gemma3TextConfig(num_hidden_layers=3, num_key_value_heads=1, head_dim=256,
                                                  sliding_window=8, layer_types=["sliding_attention",
                                                                                 "sliding_attention",
                                                                                 "full_attention"], **common))
    if arch == "mistral":  # sliding window, MQA
        from transformers import MistralConfig, MistralForCausalLM
        return MistralForCausalLM(MistralConfig(num_hidden_layers=2, num_key_value_heads=1, head_dim=16,
                                                sliding_window=12, **common))
    raise ValueError(arch)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3", "mistral"])
def test_other_architectures_calibrate_and_generate(arch, texts):
    """Calibration records what each layer hands to the cache, so norms, rotations, sliding layers and head shapes
    of any architecture are covered; the cache then matches a simulated per-token quantizing cache."""
    torch.manual_seed(3)
    model = _tiny(arch).eval()
    quantizers = calibrate(model, texts, group_size=8, bits=6, iters=4, progress=False)
    n_layers = model.config.num_hidden_layers
    channels = model.config.num_key_value_heads * model.config.head_dim
    assert len(quantizers) == n_layers and all(k.channels == v.channels == channels for k, v in quantizers)
    fisher = calibrate(model, texts[:2], group_size=8, bits=4, fisher=True, iters=2, progress=False)
    assert len(fisher) == n_layers and all(bool(k.fitted) and bool(v.fitted) for k, v in fisher)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model.generate(ids, past_key_values=CoupledQuantizedCache(quantizers, window=6), max_new_tokens=8,
                             min_new_tokens=8, do_sample=False)
        assert out.shape == (2, 28)
        logits = []
        for cache in (CoupledQuantizedCache(quantizers, window=6), SimulatedCQCache(quantizers, 6)):
            model(input_ids=ids, past_key_values=cache, use_cache=True)
            logits.append(torch.cat([model(input_ids=out[:, 20 + i:21 + i], past_key_values=cache,
                                           use_cache=True).logits for i in range(8)], 1))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_pre_rope_calibration_needs_the_llama_layout(texts):
    torch.manual_seed(5)
    model = _tiny("gemma3").eval()
    model.model.layers[0].self_attn.k_proj = None  # not a Llama-layout projection any more
    with pytest.raises(ValueError, match="Llama-layout"):
        calibrate(model, texts, group_size=8, bits=4, rope="pre", iters=1, progress=False)


def test_quantizers_save_and_load(tmp_path, model, texts, quantizers):
    """One file with every layer's codebooks and what they were fitted on; the loader refuses another model and
    damaged files, and the cache refuses quantizers fitted in the other RoPE frame."""
    path = tmp_path / "q.safetensors"
    cq.save_quantizers(path, quantizers, model)
    loaded = cq.load_quantizers(path, model)
    assert len(loaded) == len(quantizers)
    for (k0, v0), (k1, v1) in zip(quantizers, loaded):
        assert torch.equal(k0.codebooks, k1.codebooks) and torch.equal(v0.codebooks, v1.codebooks)
        assert (k1.group_size, k1.bits, k1.rope) == (4, 8, "post")
    ids = torch.randint(0, 97, (1, 15))
    with torch.no_grad():
        want = model(input_ids=ids, past_key_values=CoupledQuantizedCache(quantizers, window=4)).logits
        got = model(input_ids=ids, past_key_values=CoupledQuantizedCache(loaded, window=4)).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    other = _tiny("qwen3")
    with pytest.raises(ValueError, match="another model"):
        cq.load_quantizers(path, other)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    (tmp_path / "bad").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        cq.load_quantizers(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes(data[:100]))
    with pytest.raises(ValueError, match="not a readable"):
        cq.load_quantizers(tmp_path / "short")
    pre = calibrate(model, texts[:1], group_size=4, bits=4, rope="pre", iters=1, progress=False)
    with pytest.raises(ValueError, match="pre-RoPE"):
        CoupledQuantizedCache(pre, window=4)
    with pytest.raises(ValueError, match="rope='pre'"):
        CoupledQuantizedCache(quantizers, window=4, rotary_emb=model.model.rotary_emb)


def _count_codes_attention(monkeypatch):
    """Counts the calls of cq.attention made by the "cq" attention, and how many had starts (a mask)."""
    calls = {"all": 0, "starts": 0}
    real = cache_module.attention

    def counting(*args, starts=None, **kwargs):
        calls["all"] += 1
        calls["starts"] += starts is not None
        return real(*args, starts=starts, **kwargs)

    monkeypatch.setattr(cache_module, "attention", counting)
    return calls


def test_padded_batch_generates_like_one_sequence_at_a_time(model, quantizers, monkeypatch):
    """Left padding: each row of a padded batch decodes the tokens it would decode alone, every decode step
    attending from the codes (the padding mask goes to the kernel as a first visible position per row)."""
    gen = torch.Generator().manual_seed(6)
    rows = [torch.randint(1, 97, (n,), generator=gen) for n in (14, 9)]
    ids = torch.zeros(2, 14, dtype=torch.long)
    mask = torch.zeros(2, 14, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 14 - r.numel():], mask[i, 14 - r.numel():] = r, 1
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    calls = _count_codes_attention(monkeypatch)
    cache_module._WARNED.clear()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback to the decoded history
            batch = model.generate(ids, attention_mask=mask, past_key_values=CoupledQuantizedCache(
                quantizers, window=4, codes_attention=True, model=model), **kw)
        n_layers = model.config.num_hidden_layers
        assert calls == {"all": 5 * n_layers, "starts": 5 * n_layers}  # every decode step after the prefill
        with torch.no_grad():
            for i, r in enumerate(rows):
                alone = model.generate(r[None], past_key_values=CoupledQuantizedCache(quantizers, window=4), **kw)
                assert torch.equal(batch[i, 14:], alone[0, r.numel():])
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("arch", ["gemma3", "mistral"])
def test_sliding_window_layers_free_codes_and_attend_from_them(arch, texts, monkeypatch):
    """Sliding-window layers (known from the model's config) free the codes no later query can see, and their
    causal masks with a first visible position go to the kernel: decode logits match a simulated per-token
    quantizing cache that keeps everything, with and without codes attention."""
    torch.manual_seed(7)
    model = _tiny(arch).eval()
    quantizers = calibrate(model, texts, group_size=8, bits=6, iters=3, progress=False)
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(8))
    nxt = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(9))
    calls = _count_codes_attention(monkeypatch)
    caches = [SimulatedCQCache(quantizers, 4), CoupledQuantizedCache(quantizers, window=4, config=model.config),
              CoupledQuantizedCache(quantizers, window=4, codes_attention=True, model=model)]
    logits = []
    try:
        for cache in caches:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("error")
                model(input_ids=ids, past_key_values=cache, use_cache=True)
                logits.append(torch.cat([model(input_ids=nxt[:, i:i + 1], past_key_values=cache,
                                               use_cache=True).logits for i in range(12)], 1))
    finally:
        model.set_attn_implementation("sdpa")
    assert calls["all"] == 12 * model.config.num_hidden_layers and calls["starts"] > 0
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[2], logits[0], rtol=1e-4, atol=1e-4)
    sizes = caches[2].nbytes()
    sliding = [layer for layer in caches[2].layers if layer.is_sliding]
    assert sliding and sizes["by_layer_type"]["sliding_attention"]["codes"] > 0
    for layer in caches[2].layers:
        held = layer.k_codes.shape[2]
        assert held == 22 - 4 - layer.code_start
        assert held < layer.sliding_window if layer.is_sliding else layer.code_start == 0


def test_other_masks_fall_back_to_the_decoded_history():
    """Only "causal from a first position" masks go to the kernel; a mask with a hole does not."""
    length, tq = 9, 2
    pos = torch.arange(length)
    last = length - tq + torch.arange(tq)
    starts = torch.tensor([[0, 0], [3, 5]])
    mask = (pos >= starts[..., None]) & (pos <= last[:, None])
    assert torch.equal(cache_module._mask_starts(mask[:, None], 2, tq, length), starts)
    holed = mask.clone()
    holed[0, 1, 4] = False
    assert cache_module._mask_starts(holed[:, None], 2, tq, length) is None
    assert cache_module._mask_starts(mask[:, None].float(), 2, tq, length) is None
    assert cache_module._mask_starts(mask[:, None], 2, tq, length + 1) is None
