// Coupled quantization: op schemas and CPU glue (checks, threading, SIMD dispatch). Kernels: kernels/cpu/cq.cpp.
#include "ops/cq.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <deque>
#include <limits>
#include <mutex>
#include <optional>

#include "kernels/cpu/cq.h"
#include "ops/list_check.h"

namespace sr::ops::cq {
namespace {

// Layouts of codebooks that the kernels read (transposed, padded) are derived once per codebooks tensor: a decode
// step calls encode and attention once per layer with the same codebooks, and building the layout cost most of
// such a call (77 us of 80 for an encode with SmolLM2's 24 x 256 x 8 codebooks). The last layouts are kept, keyed
// by TensorKey (list_check.h) and `kind`, up to kMaxBytes in all.
template <class Build>
at::Tensor cached_layout(int kind, const at::Tensor& src, Build&& build) {
  std::optional<TensorKey> key = TensorKey::of({src}, {kind});
  if (!key) return build();
  struct Entry {
    TensorKey key;
    at::Tensor layout;
    int64_t bytes;
  };
  static std::mutex mutex;
  static std::deque<Entry> cache;  // most recently used last
  static int64_t cached_bytes = 0;
  constexpr int64_t kMaxBytes = int64_t{256} << 20;
  {
    std::lock_guard<std::mutex> lock(mutex);
    for (auto it = cache.rbegin(); it != cache.rend(); ++it) {
      if (it->key == *key) return it->layout;
    }
  }
  at::Tensor layout = build();
  const int64_t bytes = layout.numel() * static_cast<int64_t>(layout.element_size());
  if (bytes > kMaxBytes / 4) return layout;
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& e : cache) cached_bytes -= e.key.expired() ? e.bytes : 0;
  cache.erase(std::remove_if(cache.begin(), cache.end(), [](const Entry& e) { return e.key.expired(); }), cache.end());
  while (!cache.empty() && cached_bytes + bytes > kMaxBytes) {
    cached_bytes -= cache.front().bytes;
    cache.pop_front();
  }
  cache.push_back({std::move(*key), layout, bytes});
  cached_bytes += bytes;
  return layout;
}

enum Layout { kEncodeBooks, kAttentionBooks };

at::Tensor encode_cpu(const at::Tensor& x, const at::Tensor& codebooks) {
  auto codes = checked_encode_output(x, codebooks);
  const int64_t groups = codebooks.size(0), k = codebooks.size(1), g = codebooks.size(2);
  const int64_t rows = x.numel() / (groups * g);
  if (rows == 0) return codes;
  auto xf = x.to(at::kFloat).contiguous();
  // Transposed (groups, g, k_padded) so a vector of 16 centroids is one load; NaN padding never wins.
  const int64_t kp = (k + 15) / 16 * 16;
  const at::Tensor books_t = cached_layout(kEncodeBooks, codebooks, [&] {
    auto t = at::full({groups, kp, g}, std::numeric_limits<float>::quiet_NaN(), xf.options());
    t.narrow(1, 0, k).copy_(codebooks);
    return t.transpose(1, 2).contiguous();
  });
  const float* xp = xf.data_ptr<float>();
  const float* bp = books_t.data_ptr<float>();
  char* cp = static_cast<char*>(codes.data_ptr());
  const int code_bytes = static_cast<int>(codes.element_size());
  const int64_t grain = std::max<int64_t>(1, 2048 / (groups * kp / 16 + 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    SR_SIMD_DISPATCH(cq_encode_rows, xp + begin * groups * g, end - begin, groups, g, kp, bp,
                     cp + begin * groups * code_bytes, code_bytes);
  });
  return codes;
}

at::Tensor decode_cpu(const at::Tensor& codes, const at::Tensor& codebooks) {
  auto out = checked_decode_output(codes, codebooks);
  const int64_t groups = codebooks.size(0), k = codebooks.size(1), g = codebooks.size(2);
  const int64_t rows = codes.numel() / groups;
  if (rows == 0) return out;
  auto c = codes.contiguous();
  auto books = codebooks.contiguous();
  const char* cp = static_cast<const char*>(c.data_ptr());
  const int code_bytes = static_cast<int>(c.element_size()), elem_bytes = static_cast<int>(books.element_size());
  char* op = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / groups), [&](int64_t begin, int64_t end) {
    SR_SIMD_DISPATCH(cq_decode_rows, cp + begin * groups * code_bytes, code_bytes, end - begin, groups, g, k,
                     books.data_ptr(), elem_bytes, op + begin * groups * g * elem_bytes);
  });
  return out;
}

at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k_codes, const at::Tensor& v_codes,
                         const at::Tensor& k_codebooks, const at::Tensor& v_codebooks,
                         const std::optional<at::Tensor>& k_recent, const std::optional<at::Tensor>& v_recent,
                         const std::optional<at::Tensor>& lengths, std::optional<double> scale,
                         const std::optional<at::Tensor>& starts) {
  const AttentionSizes s =
      check_attention(q, k_codes, v_codes, k_codebooks, v_codebooks, k_recent, v_recent, lengths, scale, starts);
  auto out = at::empty({s.B, s.Hq, s.Tq, s.D}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  auto qf = q.to(at::kFloat).contiguous();
  // Each head's (T, G) block must be dense; heads may sit apart (a cache's codes inside a larger buffer).
  auto dense_heads = [&](const at::Tensor& c) {
    return (c.stride(3) == 1 || s.G == 1) && (c.stride(2) == s.G || s.T <= 1) ? c : c.contiguous();
  };
  auto kc = dense_heads(k_codes), vc = dense_heads(v_codes);
  auto transposed = [](const at::Tensor& books) {  // (Hkv * G, g, K)
    return cached_layout(kAttentionBooks, books, [&] { return books.to(at::kFloat).transpose(1, 2).contiguous(); });
  };
  const at::Tensor kb = transposed(k_codebooks), vb = transposed(v_codebooks);
  at::Tensor kr, vr;
  if (s.W > 0) {
    kr = k_recent->to(at::kFloat).contiguous();
    vr = v_recent->to(at::kFloat).contiguous();
  }
  at::Tensor len = lengths.has_value() ? lengths->to(at::kLong).contiguous() : at::full({s.B}, s.T, at::kLong);
  const int64_t rep = s.Hq / s.Hkv, rows = rep * s.Tq, code_bytes = kc.element_size();
  const char* kcp = static_cast<const char*>(kc.data_ptr());
  const char* vcp = static_cast<const char*>(vc.data_ptr());
  const int64_t* lp = len.data_ptr<int64_t>();
  at::Tensor st = starts.has_value() ? starts->to(at::kLong).contiguous() : at::Tensor();
  const int64_t* sp = starts.has_value() ? st.data_ptr<int64_t>() : nullptr;
  // Heads are handed out one at a time from a shared counter, so a thread that starts late (a busy machine)
  // leaves its share to the others instead of holding up the call.
  const int64_t tasks = s.B * s.Hkv;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), tasks), 1, [&](int64_t, int64_t) {
    for (int64_t bh; (bh = next.fetch_add(1, std::memory_order_relaxed)) < tasks;) {
      const int64_t b = bh / s.Hkv, h = bh % s.Hkv;
      sr::cpu::CqAttentionHead a{};
      a.q = qf.data_ptr<float>() + bh * rows * s.D;
      a.rep = rep;
      a.tq = s.Tq;
      a.d = s.D;
      a.g = s.g;
      a.k = s.K;
      a.k_codes = kcp + (b * kc.stride(0) + h * kc.stride(1)) * code_bytes;
      a.v_codes = vcp + (b * vc.stride(0) + h * vc.stride(1)) * code_bytes;
      a.code_bytes = static_cast<int>(code_bytes);
      a.t_coded = s.T;
      a.length = lp[b];
      a.starts = sp != nullptr ? sp + b * s.Tq : nullptr;
      a.k_books_t = kb.data_ptr<float>() + h * s.G * s.g * s.K;
      a.v_books_t = vb.data_ptr<float>() + h * s.G * s.g * s.K;
      a.k_recent = s.W > 0 ? kr.data_ptr<float>() + bh * s.W * s.D : nullptr;
      a.v_recent = s.W > 0 ? vr.data_ptr<float>() + bh * s.W * s.D : nullptr;
      a.w = s.W;
      a.scale = s.scale;
      a.out = out.data_ptr<float>() + bh * rows * s.D;
      SR_SIMD_DISPATCH(cq_attention_head, a);
    }
  });
  return out;
}

}  // namespace
}  // namespace sr::ops::cq

TORCH_LIBRARY_FRAGMENT(sparse_retrieval, m) {
  m.def("cq_encode(Tensor x, Tensor codebooks) -> Tensor");
  m.def("cq_decode(Tensor codes, Tensor codebooks) -> Tensor");
  m.def(
      "cq_attention(Tensor q, Tensor k_codes, Tensor v_codes, Tensor k_codebooks, Tensor v_codebooks, "
      "Tensor? k_recent=None, Tensor? v_recent=None, Tensor? lengths=None, float? scale=None, "
      "Tensor? starts=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparse_retrieval, CPU, m) {
  m.impl("cq_encode", &sr::ops::cq::encode_cpu);
  m.impl("cq_decode", &sr::ops::cq::decode_cpu);
  m.impl("cq_attention", &sr::ops::cq::attention_cpu);
}
