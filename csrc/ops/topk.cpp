// Schema, autograd and CPU glue of top-k: threading over rows (and over chunks of a row when rows are fewer than
// threads) and SIMD dispatch. The kernels are in csrc/kernels/cpu/topk.cpp.
#include "ops/topk.h"

#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "kernels/cpu/topk.h"

namespace {

using sr::cpu::TopkDtype;

// Below this many elements a thread is not worth starting: short rows are batched, long rows split into chunks
// of at least this size.
constexpr int64_t kMinWork = 1 << 15;

std::tuple<at::Tensor, at::Tensor> topk_cpu(const at::Tensor& x, int64_t k, int64_t dim, bool largest,
                                            bool sorted) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "topk: x must be a CPU tensor here, got ", x.device());
  sr::ops::TopkProblem p = sr::ops::topk_prepare(x, k, dim);
  if (p.k == 0 || p.rows == 0) return sr::ops::topk_result(p);

  const TopkDtype dtype = sr::ops::topk_dtype(p.src.scalar_type());
  const int64_t n = p.n, rows = p.rows, es = p.src.element_size();
  const char* src = static_cast<const char*>(p.src.data_ptr());
  char* values = static_cast<char*>(p.values.data_ptr());
  int64_t* indices = p.indices.data_ptr<int64_t>();
  const auto row_ptr = [&](int64_t r) { return src + r * n * es; };
  const auto emit = [&](int64_t r, uint64_t* keys, int64_t count) {
    SR_SIMD_DISPATCH(topk_emit, keys, count, k, sorted, row_ptr(r), dtype, values + r * k * es, indices + r * k);
  };

  // Split rows into chunks only when threads would otherwise idle and each chunk's k survivors are few.
  const int64_t threads = at::get_num_threads();
  int64_t chunks = 1;
  if (rows < threads) {
    chunks = std::min((threads + rows - 1) / rows, n / kMinWork);
    if (chunks < 2 || k * 4 > n / chunks) chunks = 1;
  }

  if (chunks == 1) {
    at::parallel_for(0, rows, std::max<int64_t>(1, kMinWork / n), [&](int64_t begin, int64_t end) {
      std::vector<uint64_t> keys(k);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t count = SR_SIMD_DISPATCH(topk_select, row_ptr(r), dtype, 0, n, k, largest, keys.data());
        emit(r, keys.data(), count);
      }
    });
    return sr::ops::topk_result(p);
  }

  // Each chunk keeps its own best k (global indices), then each row merges its chunks' candidates.
  std::vector<uint64_t> keys(rows * chunks * k);
  std::vector<int64_t> counts(rows * chunks);
  at::parallel_for(0, rows * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / chunks, j = t % chunks;
      counts[t] = SR_SIMD_DISPATCH(topk_select, row_ptr(r), dtype, n * j / chunks, n * (j + 1) / chunks, k,
                                   largest, keys.data() + t * k);
    }
  });
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      uint64_t* row_keys = keys.data() + r * chunks * k;
      int64_t total = counts[r * chunks];
      for (int64_t j = 1; j < chunks; ++j) {
        const int64_t t = r * chunks + j;
        std::memmove(row_keys + total, keys.data() + t * k, counts[t] * sizeof(uint64_t));
        total += counts[t];
      }
      emit(r, row_keys, total);
    }
  });
  return sr::ops::topk_result(p);
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The gradient of the values scatters back to the selected positions. In C++ rather than with
// torch.library.register_autograd: a Python autograd kernel costs about 3.5 us on every call, more than the
// whole op on small rows.
class TopkFunction : public torch::autograd::Function<TopkFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, int64_t k, int64_t dim, bool largest,
                               bool sorted) {
    using Signature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, int64_t, bool, bool);
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("sparse_retrieval::topk", "").typed<Signature>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [values, indices] = op.call(x, k, dim, largest, sorted);
    ctx->save_for_backward({indices});
    ctx->saved_data["shape"] = x.sizes();
    ctx->saved_data["dim"] = dim;
    ctx->mark_non_differentiable({indices});
    return {values, indices};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor indices = ctx->get_saved_variables()[0];
    const auto shape = ctx->saved_data["shape"].toIntVector();
    const at::Tensor& grad = grads[0];
    at::Tensor grad_x;
    if (shape.empty()) {  // 0-dim input: its gradient is the value's when it was selected (k = 1)
      grad_x = indices.numel() ? grad.reshape({}) : at::zeros({}, grad.options());
    } else {
      grad_x = at::zeros(shape, grad.options()).scatter(ctx->saved_data["dim"].toInt(), indices, grad);
    }
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> topk_autograd(const at::Tensor& x, int64_t k, int64_t dim, bool largest,
                                                 bool sorted) {
  sr::ops::require_defined(x, "x");
  const variable_list out = TopkFunction::apply(x, k, dim, largest, sorted);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparse_retrieval, m) {
  m.def("topk(Tensor x, int k, int dim=-1, bool largest=True, bool sorted=True) -> (Tensor values, Tensor indices)");
}

TORCH_LIBRARY_IMPL(sparse_retrieval, CPU, m) { m.impl("topk", &topk_cpu); }

TORCH_LIBRARY_IMPL(sparse_retrieval, Autograd, m) { m.impl("topk", &topk_autograd); }
