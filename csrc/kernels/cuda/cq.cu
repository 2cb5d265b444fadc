#include "kernels/cuda/cq.h"

#include <cfloat>
#include <cmath>
#include <map>
#include <utility>

namespace sr::cuda {
namespace {

constexpr int kThreads = 256;
// Codebook bytes of one group that are staged in shared memory (larger ones are read through the cache).
constexpr int64_t kSharedBookBytes = 32 * 1024;

inline unsigned blocks_for(int64_t n, int threads = kThreads) {
  return static_cast<unsigned>((n + threads - 1) / threads);
}

// ---- encode / decode ------------------------------------------------------------------------------------------

// grid (row blocks, groups): the threads of a block share one group's codebook.
template <typename C>
__global__ void encode_kernel(const float* __restrict__ x, int64_t rows, int64_t groups, int64_t g, int64_t k,
                              const float* __restrict__ books, C* __restrict__ codes, bool stage) {
  extern __shared__ float shared_book[];
  const int64_t j = blockIdx.y;
  const float* book = books + j * k * g;
  if (stage) {
    for (int64_t i = threadIdx.x; i < k * g; i += blockDim.x) shared_book[i] = book[i];
    __syncthreads();
    book = shared_book;
  }
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const float* xv = x + (row * groups + j) * g;
  float best = INFINITY;
  int64_t best_c = 0;
  for (int64_t c = 0; c < k; ++c) {
    float dist = 0.f;
    for (int64_t e = 0; e < g; ++e) {
      const float diff = xv[e] - book[c * g + e];
      dist += diff * diff;
    }
    if (dist < best) {  // strict: ties keep the lowest code
      best = dist;
      best_c = c;
    }
  }
  codes[row * groups + j] = static_cast<C>(best_c);
}

template <typename C, typename E>
__global__ void decode_kernel(const C* __restrict__ codes, int64_t rows, int64_t groups, int64_t g, int64_t k,
                              const E* __restrict__ books, E* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * groups * g) return;
  const int64_t e = i % g, rg = i / g, j = rg % groups;
  out[i] = books[(j * k + static_cast<int64_t>(codes[rg])) * g + e];
}

// ---- attention, multi-pass (the default; also where the fused kernel's tables do not fit in shared memory) ------
// Rows r = (query head within the kv head's group) * Tq + query token; R = rep * Tq rows per (b, kv head).
// Workspace: lut (BH, G, k, R), scores (BH, R, S = T + W), row max and 1 / sum (BH * R each).

struct Dims {
  int64_t R, G, S;
};

inline Dims dims_of(const CqAttentionArgs& a) {
  return {a.Hq / a.Hkv * a.Tq, a.D / a.g, a.t_coded + a.w};
}

// How many coded tokens and window slots row r may see (the query sits at position T + W - Tq + t).
__device__ inline void visible(const CqAttentionArgs& a, int64_t b, int64_t r, int64_t* n_coded, int64_t* n_win) {
  const int64_t t = r % a.Tq, qpos = a.t_coded + a.w - a.Tq + t;
  const int64_t zero = 0;
  const int64_t length = a.lengths != nullptr ? a.lengths[b] : a.t_coded;
  *n_coded = max(zero, min(min(length, qpos + 1), a.t_coded));
  *n_win = max(zero, min(a.w - a.Tq + t + 1, a.w));
}

__global__ void lut_kernel(CqAttentionArgs a, Dims d, float* __restrict__ lut) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t BH = a.B * a.Hkv;
  if (i >= BH * d.G * a.k * d.R) return;
  const int64_t r = i % d.R, c = (i / d.R) % a.k, j = (i / (d.R * a.k)) % d.G, bh = i / (d.R * a.k * d.G);
  const int64_t h = bh % a.Hkv;
  const float* q = a.q + (bh * d.R + r) * a.D + j * a.g;
  const float* centroid = a.k_books + ((h * d.G + j) * a.k + c) * a.g;
  float dot = 0.f;
  for (int64_t e = 0; e < a.g; ++e) dot += q[e] * centroid[e];
  lut[i] = dot * a.scale;
}

template <typename C>
__global__ void scores_kernel(CqAttentionArgs a, Dims d, const float* __restrict__ lut, float* __restrict__ scores) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t bh = blockIdx.y, b = bh / a.Hkv, h = bh % a.Hkv;
  if (p >= d.S) return;
  const float* lut_bh = lut + bh * d.G * a.k * d.R;
  const C* codes = static_cast<const C*>(a.k_codes) + b * a.stride_b + h * a.stride_h;
  for (int64_t r = 0; r < d.R; ++r) {
    int64_t n_coded, n_win;
    visible(a, b, r, &n_coded, &n_win);
    float s = -INFINITY;
    if (p < a.t_coded) {
      if (p < n_coded) {
        s = 0.f;
        for (int64_t j = 0; j < d.G; ++j) s += lut_bh[(j * a.k + static_cast<int64_t>(codes[p * d.G + j])) * d.R + r];
      }
    } else if (p - a.t_coded < n_win) {
      const float* q = a.q + (bh * d.R + r) * a.D;
      const float* key = a.k_recent + (bh * a.w + (p - a.t_coded)) * a.D;
      s = 0.f;
      for (int64_t e = 0; e < a.D; ++e) s += q[e] * key[e];
      s *= a.scale;
    }
    scores[(bh * d.R + r) * d.S + p] = s;
  }
}

__device__ inline float block_reduce(float v, bool is_max) {
  __shared__ float partial[32];
  for (int off = 16; off > 0; off /= 2) {
    const float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = is_max ? fmaxf(v, o) : v + o;
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < warps ? partial[lane] : (is_max ? -INFINITY : 0.f);
  for (int off = 16; off > 0; off /= 2) {
    const float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = is_max ? fmaxf(v, o) : v + o;
  }
  return v;
}

// One block per row: max and 1 / sum of exp (0 when the row sees nothing).
__global__ void softmax_stats_kernel(const float* __restrict__ scores, int64_t S, float* __restrict__ row_max,
                                     float* __restrict__ row_inv) {
  const float* s = scores + static_cast<int64_t>(blockIdx.x) * S;
  float m = -INFINITY;
  for (int64_t p = threadIdx.x; p < S; p += blockDim.x) m = fmaxf(m, s[p]);
  m = block_reduce(m, true);
  float sum = 0.f;
  if (m > -INFINITY) {
    for (int64_t p = threadIdx.x; p < S; p += blockDim.x) sum += __expf(s[p] - m);
  }
  sum = block_reduce(sum, false);
  if (threadIdx.x == 0) {
    row_max[blockIdx.x] = m;
    row_inv[blockIdx.x] = sum > 0.f ? 1.f / sum : 0.f;
  }
}

// grid (rows, splits), one thread per channel: weighted values of a slice of tokens, added into out.
template <typename C>
__global__ void output_kernel(CqAttentionArgs a, Dims d, const float* __restrict__ scores,
                              const float* __restrict__ row_max, const float* __restrict__ row_inv, int64_t chunk) {
  const int64_t row = blockIdx.x, bh = row / d.R, b = bh / a.Hkv, h = bh % a.Hkv;
  const int64_t e = threadIdx.x;
  const float inv = row_inv[row], m = row_max[row];
  if (inv == 0.f || e >= a.D) return;
  const int64_t j = e / a.g, within = e % a.g;
  const C* codes = static_cast<const C*>(a.v_codes) + b * a.stride_b + h * a.stride_h;
  const float* book = a.v_books + (h * d.G + j) * a.k * a.g;
  const float* s = scores + row * d.S;
  const int64_t begin = blockIdx.y * chunk, end = min(d.S, begin + chunk);
  float acc = 0.f;
  for (int64_t p = begin; p < end; ++p) {
    const float wgt = __expf(s[p] - m);
    if (wgt == 0.f) continue;
    const float v = p < a.t_coded ? book[static_cast<int64_t>(codes[p * d.G + j]) * a.g + within]
                                  : a.v_recent[(bh * a.w + (p - a.t_coded)) * a.D + e];
    acc += wgt * v;
  }
  atomicAdd(a.out + row * a.D + e, acc * inv);
}

template <typename C>
void multipass_attention(const CqAttentionArgs& a, float* workspace, cudaStream_t stream) {
  const Dims d = dims_of(a);
  const int64_t BH = a.B * a.Hkv, rows = BH * d.R;
  float* lut = workspace;
  float* scores = lut + BH * d.G * a.k * d.R;
  float* row_max = scores + rows * d.S;
  float* row_inv = row_max + rows;
  cudaMemsetAsync(a.out, 0, sizeof(float) * rows * a.D, stream);
  lut_kernel<<<blocks_for(BH * d.G * a.k * d.R), kThreads, 0, stream>>>(a, d, lut);
  if (d.S == 0) return;
  scores_kernel<C><<<dim3(blocks_for(d.S), static_cast<unsigned>(BH)), kThreads, 0, stream>>>(a, d, lut, scores);
  softmax_stats_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(scores, d.S, row_max, row_inv);
  const int64_t chunk = 512;
  const unsigned threads = static_cast<unsigned>((a.D + 31) / 32 * 32);
  output_kernel<C><<<dim3(static_cast<unsigned>(rows), blocks_for(d.S, chunk)), threads, 0, stream>>>(
      a, d, scores, row_max, row_inv, chunk);
}

// ---- attention, fused (cq_fused.h) ----------------------------------------------------------------------------

constexpr int kFusedThreads = 512;
constexpr int64_t kMinSplit = 512;

struct FusedBlock {
  cqfused::Regs* regs_;
  template <class F>
  __device__ __forceinline__ void each(F&& f) {
    f(static_cast<int>(threadIdx.x));
    __syncthreads();
  }
  __device__ __forceinline__ void block_max(uint32_t* p, uint32_t v) {
    v = __reduce_max_sync(0xFFFFFFFFu, v);  // kFusedThreads is a multiple of 32 and every thread calls this
    if (threadIdx.x % 32 == 0) atomicMax(p, v);
  }
  __device__ __forceinline__ cqfused::Regs& regs(int) { return *regs_; }
};

template <typename C, int VEC, int CW>
__global__ void __launch_bounds__(kFusedThreads)
    fused_split_kernel(CqAttentionArgs a, cqfused::Plan p, float* part_o, float* part_ml) {
  extern __shared__ __align__(16) unsigned char smem[];
  cqfused::Regs regs;
  FusedBlock blk{&regs};
  cqfused::coded_split<C, VEC, CW>(blk, a, p, blockIdx.x, smem, part_o, part_ml);
}

template <typename C, int VEC>
auto split_kernel_for(int code_words) {
  if constexpr (sizeof(C) == 1) {
    if (code_words == 1) return fused_split_kernel<C, VEC, 1>;
    if (code_words == 2) return fused_split_kernel<C, VEC, 2>;
  }
  return fused_split_kernel<C, VEC, 0>;
}

__global__ void __launch_bounds__(kFusedThreads)
    fused_merge_kernel(CqAttentionArgs a, cqfused::Plan p, const float* part_o, const float* part_ml) {
  extern __shared__ __align__(16) unsigned char smem[];
  FusedBlock blk{nullptr};
  cqfused::merge_row(blk, a, p, blockIdx.x, reinterpret_cast<float*>(smem), part_o, part_ml);
}

int device_attribute(cudaDeviceAttr attr) {
  int device = 0, value = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&value, attr, device);
  return value;
}

// cudaFuncSetAttribute once per device, kernel and size (it costs a driver call; the size only grows).
template <class Kernel>
void allow_shared(Kernel kernel, size_t bytes) {
  static thread_local std::map<std::pair<int, const void*>, size_t> allowed;
  int device = 0;
  cudaGetDevice(&device);
  size_t& have = allowed[{device, reinterpret_cast<const void*>(kernel)}];
  if (bytes > have) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    have = bytes;
  }
}

template <typename C>
void fused_attention(const CqAttentionArgs& a, const cqfused::Plan& p, float* workspace, cudaStream_t stream) {
  const int64_t rows = a.B * a.Hkv * p.R;
  float* part_ml = workspace;
  float* part_o = part_ml + rows * p.splits * 2;
  const int64_t blocks = a.B * a.Hkv * p.chunks * p.splits;
  auto split_kernel = p.vec == 4 ? split_kernel_for<C, 4>(p.code_words) : split_kernel_for<C, 1>(p.code_words);
  allow_shared(split_kernel, p.shared_bytes);
  split_kernel<<<static_cast<unsigned>(blocks), p.threads, p.shared_bytes, stream>>>(a, p, part_o, part_ml);
  const size_t merge_bytes = sizeof(float) * (2 * a.w + p.splits);
  allow_shared(fused_merge_kernel, merge_bytes);
  fused_merge_kernel<<<static_cast<unsigned>(rows), p.threads, merge_bytes, stream>>>(a, p, part_o, part_ml);
}

}  // namespace

void cq_encode(const float* x, int64_t rows, int64_t groups, int64_t g, int64_t k, const float* books, void* codes,
               int code_bytes, cudaStream_t stream) {
  if (rows == 0) return;
  const bool stage = k * g * static_cast<int64_t>(sizeof(float)) <= kSharedBookBytes;
  const size_t shared = stage ? sizeof(float) * k * g : 0;
  const dim3 grid(blocks_for(rows), static_cast<unsigned>(groups));
  if (code_bytes == 1) {
    encode_kernel<uint8_t><<<grid, kThreads, shared, stream>>>(x, rows, groups, g, k, books,
                                                               static_cast<uint8_t*>(codes), stage);
  } else {
    encode_kernel<int16_t><<<grid, kThreads, shared, stream>>>(x, rows, groups, g, k, books,
                                                               static_cast<int16_t*>(codes), stage);
  }
}

void cq_decode(const void* codes, int code_bytes, int64_t rows, int64_t groups, int64_t g, int64_t k,
               const void* books, int elem_bytes, void* out, cudaStream_t stream) {
  const int64_t n = rows * groups * g;
  if (n == 0) return;
  const unsigned blocks = blocks_for(n);
  auto launch = [&](auto code_tag) {
    using C = decltype(code_tag);
    const C* c = static_cast<const C*>(codes);
    if (elem_bytes == 4) {
      decode_kernel<<<blocks, kThreads, 0, stream>>>(c, rows, groups, g, k, static_cast<const uint32_t*>(books),
                                                     static_cast<uint32_t*>(out));
    } else {
      decode_kernel<<<blocks, kThreads, 0, stream>>>(c, rows, groups, g, k, static_cast<const uint16_t*>(books),
                                                     static_cast<uint16_t*>(out));
    }
  };
  if (code_bytes == 1) {
    launch(uint8_t{});
  } else {
    launch(int16_t{});
  }
}

CqAttentionLaunch cq_attention_plan(const CqAttentionArgs& a) {
  CqAttentionLaunch launch{};
  const int64_t rows = a.B * a.Hq * a.Tq;
  if (opted_in("SPARSE_RETRIEVAL_CQ_FUSED")) {
    const int64_t shared_limit = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
    // A block takes most of an SM's shared memory: splits for one wave of blocks.
    launch.fused = cqfused::make_plan(a, kFusedThreads, static_cast<size_t>(shared_limit),
                                      device_attribute(cudaDevAttrMultiProcessorCount), kMinSplit);
    if (static_cast<int64_t>(sizeof(float)) * (2 * a.w + launch.fused.splits) > shared_limit) {
      launch.fused.rows_per_block = 0;  // the merge's window scores do not fit
    }
  }
  const cqfused::Plan& p = launch.fused;
  if (p.rows_per_block > 0) {
    launch.workspace_floats = rows * p.splits * (a.D + 2);
  } else {
    const Dims d = dims_of(a);
    const int64_t BH = a.B * a.Hkv;
    launch.workspace_floats = BH * d.G * a.k * d.R + BH * d.R * (d.S + 2);
  }
  return launch;
}

void cq_attention(const CqAttentionArgs& a, const CqAttentionLaunch& launch, float* workspace, cudaStream_t stream) {
  if (a.B * a.Hq * a.Tq * a.D == 0) return;
  const bool fused = launch.fused.rows_per_block > 0;
  if (a.code_bytes == 1) {
    fused ? fused_attention<uint8_t>(a, launch.fused, workspace, stream)
          : multipass_attention<uint8_t>(a, workspace, stream);
  } else {
    fused ? fused_attention<int16_t>(a, launch.fused, workspace, stream)
          : multipass_attention<int16_t>(a, workspace, stream);
  }
}

}  // namespace sr::cuda
