// Coupled quantization: CUDA glue (checks, device guard, stream). Kernels: kernels/cuda/cq.cu.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "kernels/cuda/cq.h"
#include "ops/cq.h"

namespace sr::ops::cq {
namespace {

void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* name) {
  TORCH_CHECK_VALUE(b.device() == a.device(), name, " is on ", b.device(), ", expected ", a.device());
}

at::Tensor encode_cuda(const at::Tensor& x, const at::Tensor& codebooks) {
  auto codes = checked_encode_output(x, codebooks);
  const int64_t groups = codebooks.size(0), k = codebooks.size(1), g = codebooks.size(2);
  const c10::cuda::CUDAGuard guard(x.device());
  auto xf = x.to(at::kFloat).contiguous();
  auto books = codebooks.to(at::kFloat).contiguous();
  sr::cuda::cq_encode(xf.data_ptr<float>(), x.numel() / (groups * g), groups, g, k, books.data_ptr<float>(),
                      codes.data_ptr(), static_cast<int>(codes.element_size()),
                      at::cuda::getCurrentCUDAStream());
  return codes;
}

at::Tensor decode_cuda(const at::Tensor& codes, const at::Tensor& codebooks) {
  auto out = checked_decode_output(codes, codebooks);
  const int64_t groups = codebooks.size(0), k = codebooks.size(1), g = codebooks.size(2);
  const c10::cuda::CUDAGuard guard(codes.device());
  auto c = codes.contiguous();
  auto books = codebooks.contiguous();
  sr::cuda::cq_decode(c.data_ptr(), static_cast<int>(c.element_size()), codes.numel() / groups, groups, g, k,
                      books.data_ptr(), static_cast<int>(books.element_size()), out.data_ptr(),
                      at::cuda::getCurrentCUDAStream());
  return out;
}

at::Tensor attention_cuda(const at::Tensor& q, const at::Tensor& k_codes, const at::Tensor& v_codes,
                          const at::Tensor& k_codebooks, const at::Tensor& v_codebooks,
                          const std::optional<at::Tensor>& k_recent, const std::optional<at::Tensor>& v_recent,
                          const std::optional<at::Tensor>& lengths, std::optional<double> scale,
                          const std::optional<at::Tensor>& starts) {
  const AttentionSizes s =
      check_attention(q, k_codes, v_codes, k_codebooks, v_codebooks, k_recent, v_recent, lengths, scale, starts);
  for (const auto* t : {&k_codes, &v_codes, &k_codebooks, &v_codebooks}) check_same_device(q, *t, "codes/codebooks");
  if (k_recent.has_value()) {
    check_same_device(q, *k_recent, "k_recent");
    check_same_device(q, *v_recent, "v_recent");
  }
  if (lengths.has_value()) check_same_device(q, *lengths, "lengths");
  if (starts.has_value()) check_same_device(q, *starts, "starts");
  TORCH_CHECK_VALUE(s.D <= 1024, "head_dim ", s.D, " is above the 1024 the CUDA kernel supports");
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty({s.B, s.Hq, s.Tq, s.D}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  auto qf = q.to(at::kFloat).contiguous();
  // Each head's (T, G) block must be dense; k and v codes share one (batch, head) stride pair.
  auto dense = [&](const at::Tensor& c) {
    return (c.stride(3) == 1 || s.G == 1) && (c.stride(2) == s.G || s.T <= 1);
  };
  at::Tensor kc = k_codes, vc = v_codes;
  if (!dense(kc) || !dense(vc) || kc.strides() != vc.strides()) {
    kc = kc.contiguous();
    vc = vc.contiguous();
  }
  auto kb = k_codebooks.to(at::kFloat).contiguous(), vb = v_codebooks.to(at::kFloat).contiguous();
  at::Tensor kr, vr;
  if (s.W > 0) {
    kr = k_recent->to(at::kFloat).contiguous();
    vr = v_recent->to(at::kFloat).contiguous();
  }
  at::Tensor len = lengths.has_value() ? lengths->to(at::kLong).contiguous() : at::Tensor();
  at::Tensor st = starts.has_value() ? starts->to(at::kLong).contiguous() : at::Tensor();
  sr::cuda::CqAttentionArgs a{};
  a.q = qf.data_ptr<float>();
  a.B = s.B;
  a.Hq = s.Hq;
  a.Hkv = s.Hkv;
  a.Tq = s.Tq;
  a.D = s.D;
  a.g = s.g;
  a.k = s.K;
  a.k_codes = kc.data_ptr();
  a.v_codes = vc.data_ptr();
  a.code_bytes = static_cast<int>(kc.element_size());
  a.stride_b = kc.stride(0);
  a.stride_h = kc.stride(1);
  a.t_coded = s.T;
  a.lengths = lengths.has_value() ? len.data_ptr<int64_t>() : nullptr;
  a.starts = starts.has_value() ? st.data_ptr<int64_t>() : nullptr;
  a.k_books = kb.data_ptr<float>();
  a.v_books = vb.data_ptr<float>();
  a.k_recent = s.W > 0 ? kr.data_ptr<float>() : nullptr;
  a.v_recent = s.W > 0 ? vr.data_ptr<float>() : nullptr;
  a.w = s.W;
  a.scale = s.scale;
  a.out = out.data_ptr<float>();
  const auto launch = sr::cuda::cq_attention_plan(a);
  TORCH_CHECK_NOT_IMPLEMENTED(!starts.has_value() || launch.fused.rows_per_block > 0,
                              "cq_attention: starts= on CUDA needs the fused kernel (SPARSE_RETRIEVAL_CQ_FUSED=1 in the "
                              "environment) and its tables (", s.G, " x ", s.K, " floats per query row) in shared memory");
  auto workspace = at::empty({launch.workspace_floats}, qf.options());
  sr::cuda::cq_attention(a, launch, workspace.data_ptr<float>(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace sr::ops::cq

TORCH_LIBRARY_IMPL(sparse_retrieval, CUDA, m) {
  m.impl("cq_encode", &sr::ops::cq::encode_cuda);
  m.impl("cq_decode", &sr::ops::cq::decode_cuda);
  m.impl("cq_attention", &sr::ops::cq::attention_cuda);
}
