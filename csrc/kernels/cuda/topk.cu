// Top-k by multi-pass radix select, batched over rows (see topk.h).
//
// Every row keeps a state (prefix, mask, k_rem): the top bits of the k-th best key found so far and how many of
// the keys sharing them are still needed. A pass histograms the next digit of the keys matching the prefix
// (shared-memory histograms, merged with global atomics when several blocks share a row), then one block per row
// picks the digit holding the k_rem-th key. A row is done once all keys of the chosen bucket are needed, usually
// after the three value passes; the index passes only run for rows whose k-th value is tied.
//
// Only the first pass and one filtering pass read the whole row: the filter writes the keys above the first
// pass's bucket straight to the output and copies the bucket's keys to a per-row candidate buffer, which the
// later passes and the final gather read instead of the row. Rows whose bucket overflows the buffer (few
// distinct leading bits, e.g. many ties) skip the filter and read the row in every pass. The gather then takes
// every remaining key whose masked bits are >= the prefix: exactly k per row in all.
//
// Opt-in (SPARSE_RETRIEVAL_TOPK_RESIDENT=1), the one-read select of topk_resident.h takes the place of these
// passes wherever the rows fit the shared memory of the resident blocks (resident_kernel below).
#include "kernels/cuda/topk.h"

#include "kernels/cuda/topk_resident.h"
#include "kernels/cuda/topk_select.h"  // make_key, to_float, DeviceBlock
#include "kernels/cuda/value_load.cuh"  // visit_topk_dtype

#include <algorithm>
#include <atomic>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_segmented_sort.cuh>

namespace sr::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBins = 2048;
constexpr int kBinsPerThread = kBins / kThreads;
constexpr int kPasses = 6;
constexpr int kShift[kPasses] = {53, 42, 32, 21, 10, 0};
constexpr int kWidth[kPasses] = {11, 11, 10, 11, 11, 10};

struct RowState {
  unsigned long long prefix, mask;
  unsigned int k_rem, done;
  unsigned int bucket;   // keys in the first pass's chosen bucket: the candidates
  unsigned int use_buf;  // the candidates fit the buffer: later passes read it instead of the row
};

size_t align_up(size_t x) { return (x + 255) & ~size_t{255}; }

struct Workspace {
  RowState* state;
  unsigned int* hist;      // rows x kBins
  unsigned int* counters;  // rows: keys written to the output so far
  unsigned int* cand_count;  // rows: candidates written by the filter
  int64_t* offsets;        // rows + 1: segment bounds r * k
  unsigned int* arrive;    // rows: the one-read select's row barriers
  unsigned int* ties;      // rows x resident::kMaxParts: its tie counts per part
  unsigned long long* cand;  // rows x cap candidate keys
  int64_t cap;
  bool one_read;
  unsigned long long* keys;
  unsigned long long* sorted_keys;
  void* sort_temp;
  size_t sort_temp_bytes;
  size_t total;
};

// Candidates per row: room for a first-pass bucket of 1/16 of the row, or 16k, whichever is larger; none when
// that is most of the row anyway.
int64_t candidate_cap(int64_t n, int64_t k) { return 16 * k >= n ? 0 : std::max(16 * k, n / 16); }

// one_read: no candidate buffer (the one-read select does not use one, nor its fallback below).
Workspace layout(void* base, int64_t rows, int64_t n, int64_t k, bool sorted, bool one_read) {
  Workspace w{};
  size_t off = 0;
  const auto take = [&](size_t bytes) {
    char* p = static_cast<char*>(base) + off;
    off += align_up(bytes);
    return static_cast<void*>(p);
  };
  w.state = static_cast<RowState*>(take(rows * sizeof(RowState)));
  w.hist = static_cast<unsigned int*>(take(rows * kBins * sizeof(unsigned int)));
  w.counters = static_cast<unsigned int*>(take(rows * sizeof(unsigned int)));
  w.cand_count = static_cast<unsigned int*>(take(rows * sizeof(unsigned int)));
  w.offsets = static_cast<int64_t*>(take((rows + 1) * sizeof(int64_t)));
  w.arrive = static_cast<unsigned int*>(take(rows * sizeof(unsigned int)));
  w.ties = static_cast<unsigned int*>(take(rows * resident::kMaxParts * sizeof(unsigned int)));
  w.one_read = one_read;
  w.cap = one_read ? 0 : candidate_cap(n, k);
  w.cand = static_cast<unsigned long long*>(take(rows * w.cap * sizeof(unsigned long long)));
  w.keys = static_cast<unsigned long long*>(take(rows * k * sizeof(unsigned long long)));
  w.sorted_keys = w.keys;
  if (sorted) {
    w.sorted_keys = static_cast<unsigned long long*>(take(rows * k * sizeof(unsigned long long)));
    cub::DeviceSegmentedSort::SortKeysDescending(nullptr, w.sort_temp_bytes,
                                                 static_cast<const unsigned long long*>(nullptr),
                                                 static_cast<unsigned long long*>(nullptr), rows * k, rows,
                                                 static_cast<const int64_t*>(nullptr),
                                                 static_cast<const int64_t*>(nullptr));
    w.sort_temp = take(w.sort_temp_bytes);
  }
  w.total = off;
  return w;
}

__global__ void init_kernel(RowState* state, unsigned int* counters, unsigned int* cand_count, unsigned int* arrive,
                            int64_t* offsets, int64_t rows, int64_t k) {
  for (int64_t r = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; r <= rows; r += int64_t{gridDim.x} * blockDim.x) {
    offsets[r] = r * k;
    if (r < rows) {
      state[r] = RowState{0ull, 0ull, static_cast<unsigned int>(k), 0u, 0u, 0u};
      counters[r] = 0;
      cand_count[r] = 0;
      arrive[r] = 0;
    }
  }
}

// The keys a block of a pass reads: part b % bpr of row b / bpr, from the row itself or, once the first pass
// has filled it, from the row's candidate buffer.
template <class T>
struct KeySource {
  const T* __restrict__ x;
  int64_t n, seg;  // row length, elements per part
  const unsigned long long* __restrict__ cand;
  int64_t cap, cand_seg;  // buffer room per row, candidates per part
  int bpr;
  bool largest;

  __device__ __forceinline__ void range(int64_t r, int64_t part, const RowState& s, bool from_buf, int64_t& lo,
                                        int64_t& hi) const {
    lo = part * (from_buf ? cand_seg : seg);
    hi = from_buf ? min(static_cast<int64_t>(s.bucket), lo + cand_seg) : min(n, lo + seg);
  }
  __device__ __forceinline__ unsigned long long key(int64_t r, int64_t i, bool from_buf) const {
    return from_buf ? cand[r * cap + i]
                    : make_key(to_float(x[r * n + i]), static_cast<unsigned int>(i), largest);
  }
};

template <class T>
__global__ void __launch_bounds__(kThreads) hist_kernel(KeySource<T> src, const RowState* __restrict__ state,
                                                       unsigned int* hist, int shift, int width) {
  __shared__ unsigned int h[kBins];
  const int64_t r = blockIdx.x / src.bpr, part = blockIdx.x % src.bpr;
  const RowState s = state[r];
  if (s.done) return;
  for (int t = threadIdx.x; t < kBins; t += kThreads) h[t] = 0;
  __syncthreads();
  const bool from_buf = s.use_buf;
  int64_t lo, hi;
  src.range(r, part, s, from_buf, lo, hi);
  const unsigned int digit_mask = (1u << width) - 1;
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
    const unsigned long long key = src.key(r, i, from_buf);
    if ((key & s.mask) == s.prefix) atomicAdd(&h[(key >> shift) & digit_mask], 1u);
  }
  __syncthreads();
  unsigned int* out = hist + r * kBins;
  for (int t = threadIdx.x; t < kBins; t += kThreads) {
    if (h[t]) atomicAdd(&out[t], h[t]);
  }
}

// After the first pass, where the row's bucket fits the buffer: keys above the bucket go to the output, keys in
// it to the candidate buffer (in any order; each is found again by its index bits).
template <class T>
__global__ void __launch_bounds__(kThreads) filter_kernel(KeySource<T> src, const RowState* __restrict__ state,
                                                         unsigned long long* cand_out, unsigned int* cand_count,
                                                         unsigned int* counters, unsigned long long* keys,
                                                         int64_t k) {
  const int64_t r = blockIdx.x / src.bpr, part = blockIdx.x % src.bpr;
  const RowState s = state[r];
  if (!s.use_buf) return;
  int64_t lo, hi;
  src.range(r, part, s, false, lo, hi);
  unsigned long long* cand = cand_out + r * src.cap;
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
    const unsigned long long key = src.key(r, i, false);
    const unsigned long long m = key & s.mask;
    if (m > s.prefix) {
      const unsigned int slot = atomicAdd(&counters[r], 1u);
      if (slot < k) keys[r * k + slot] = key;
    } else if (m == s.prefix) {
      const unsigned int slot = atomicAdd(&cand_count[r], 1u);
      if (slot < src.cap) cand[slot] = key;
    }
  }
}

// One block per row: finds the digit holding the k_rem-th best matching key, updates the state, clears the
// histogram for the next pass. After the first pass it also records the bucket's size and whether it fits the
// `cap` candidates of the buffer.
__global__ void __launch_bounds__(kThreads) choose_kernel(RowState* state, unsigned int* hist, int shift, int width,
                                                         bool first, int64_t cap) {
  using Scan = cub::BlockScan<unsigned int, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int64_t r = blockIdx.x;
  const RowState s = state[r];
  if (s.done) return;
  unsigned int* h = hist + r * kBins;
  // Thread t owns bins kBins-1-8t down to kBins-8-8t: scanning threads in order walks the digits best first.
  unsigned int c[kBinsPerThread];
  unsigned int local = 0;
  for (int j = 0; j < kBinsPerThread; ++j) {
    c[j] = h[kBins - 1 - (threadIdx.x * kBinsPerThread + j)];
    local += c[j];
  }
  unsigned int above;
  Scan(scan_storage).ExclusiveSum(local, above);
  if (above < s.k_rem && above + local >= s.k_rem) {
    for (int j = 0; j < kBinsPerThread; ++j) {
      if (above + c[j] >= s.k_rem) {
        const unsigned long long digit = kBins - 1 - (threadIdx.x * kBinsPerThread + j);
        RowState next;
        next.prefix = s.prefix | (digit << shift);
        next.mask = s.mask | (static_cast<unsigned long long>((1u << width) - 1) << shift);
        next.k_rem = s.k_rem - above;
        next.done = c[j] == next.k_rem;
        next.bucket = first ? c[j] : s.bucket;
        next.use_buf = first ? c[j] <= cap : s.use_buf;
        state[r] = next;
        break;
      }
      above += c[j];
    }
  }
  for (int j = 0; j < kBinsPerThread; ++j) h[kBins - 1 - (threadIdx.x * kBinsPerThread + j)] = 0;
}

// Takes every key whose masked bits are >= the prefix, from the candidates (the keys above them are already out)
// or from the row.
template <class T>
__global__ void __launch_bounds__(kThreads) gather_kernel(KeySource<T> src, const RowState* __restrict__ state,
                                                         unsigned int* counters, unsigned long long* keys,
                                                         int64_t k) {
  const int64_t r = blockIdx.x / src.bpr, part = blockIdx.x % src.bpr;
  const RowState s = state[r];
  const bool from_buf = s.use_buf;
  int64_t lo, hi;
  src.range(r, part, s, from_buf, lo, hi);
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
    const unsigned long long key = src.key(r, i, from_buf);
    if ((key & s.mask) >= s.prefix) {
      const unsigned int slot = atomicAdd(&counters[r], 1u);
      if (slot < k) keys[r * k + slot] = key;
    }
  }
}

template <class T>
__global__ void emit_kernel(const T* __restrict__ x, int64_t n, const unsigned long long* __restrict__ keys,
                            int64_t total, int64_t k, T* __restrict__ values, int64_t* __restrict__ indices) {
  for (int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; j < total; j += int64_t{gridDim.x} * blockDim.x) {
    const int64_t idx = 0xFFFFFFFFu - static_cast<unsigned int>(keys[j]);
    values[j] = x[(j / k) * n + idx];
    indices[j] = idx;
  }
}

// ---- the one-read radix select (topk_resident.h) ----

// Every block of the row arrives at the barrier, then waits for all of them (they are resident together).
template <class P>
struct DeviceRow {
  P& b;
  unsigned int* arrive;
  unsigned int epoch;
  template <class F>
  __device__ __forceinline__ void stage(F&& f, bool last = false) {
    f(b);  // ends with __syncthreads
    if (last || b.parts == 1) return;
    if (threadIdx.x == 0) {
      const unsigned int target = ++epoch * static_cast<unsigned int>(b.parts);
      b.blk.arrive(arrive);
      while (atomicAdd(arrive, 0u) < target) __nanosleep(32);
      __threadfence();
    }
    __syncthreads();
  }
  __device__ __forceinline__ const resident::State& state(int p) const { return b.sh.st[p]; }
};

template <class T>
__global__ void __launch_bounds__(resident::kThreads)
    resident_kernel(resident::ValueCodes<T> src, resident::Plan p, unsigned int* hist, unsigned int* ties,
                    unsigned int* counters, unsigned int* arrive, unsigned long long* keys) {
  extern __shared__ unsigned int codes[];
  __shared__ resident::Shared sh;
  DeviceBlock blk;
  for (int64_t u = blockIdx.x; u < p.rows * p.parts; u += p.grid) {
    const int64_t r = u / p.parts, lo = (u % p.parts) * p.seg;
    using P = resident::Part<DeviceBlock, resident::ValueCodes<T>>;
    P b{blk, sh, codes, src,
        resident::RowGlobal{hist + r * kBins, ties + r * resident::kMaxParts, counters + r, keys + r * p.k},
        r, lo, min(p.seg, p.n - lo), static_cast<int>(u % p.parts), p.parts, p.k};
    DeviceRow<P> row{b, arrive + r, 0u};
    resident::select_row(row);
  }
}
static_assert(resident::kPasses * resident::kBins <= kBins, "the row's histograms live in its kBins counters");

// Blocks of resident_kernel<T> the device holds at once (a cooperative launch may not start more), 0 where it
// cannot run; asked once per device.
template <class T>
int64_t resident_blocks() {
  static std::atomic<int64_t> known[64];  // blocks + 1, 0 until asked
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return 0;
  if (const int64_t b = known[device].load()) return b - 1;
  constexpr size_t smem = resident::kCapacity * sizeof(unsigned int);
  int cooperative = 0, sms = 0, per_sm = 0;
  const bool ok =
      cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device) == cudaSuccess && cooperative &&
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess &&
      cudaFuncSetAttribute(resident_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) == cudaSuccess &&
      cudaFuncSetAttribute(resident_kernel<T>, cudaFuncAttributePreferredSharedMemoryCarveout,
                           cudaSharedmemCarveoutMaxShared) == cudaSuccess &&
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, resident_kernel<T>, resident::kThreads, smem) ==
          cudaSuccess;
  if (!ok) cudaGetLastError();  // clear the failed call's error
  const int64_t blocks = ok ? int64_t{sms} * per_sm : 0;
  known[device].store(blocks + 1);
  return blocks;
}

// Rows of up to blockselect::kMinPart elements stay with the block selection for k <= kSmallTopk: it already reads
// them once, several rows per block.
template <class T>
bool resident_plan(int64_t rows, int64_t n, int64_t k, resident::Plan* plan) {
  if (k <= kSmallTopk && n <= blockselect::kMinPart) return false;
  return make_plan(rows, n, k, resident::kCapacity, resident_blocks<T>(), resident::kMinPart, plan);
}

// A cooperative launch: it fails rather than start more blocks than can be resident.
template <class T>
cudaError_t launch_resident(const T* x, const resident::Plan& plan, bool largest, const Workspace& w,
                            cudaStream_t stream) {
  resident::ValueCodes<T> src{x, plan.n, largest};
  resident::Plan p = plan;
  unsigned int *hist = w.hist, *ties = w.ties, *counters = w.counters, *arrive = w.arrive;
  unsigned long long* keys = w.keys;
  void* args[] = {&src, &p, &hist, &ties, &counters, &arrive, &keys};
  return cudaLaunchCooperativeKernel(reinterpret_cast<void*>(resident_kernel<T>), dim3(static_cast<unsigned>(p.grid)),
                                     dim3(resident::kThreads), args, resident::kCapacity * sizeof(unsigned int),
                                     stream);
}

int grid_for(int64_t work, int threads) {
  return static_cast<int>(std::min<int64_t>((work + threads - 1) / threads, 65535 * 8));
}

template <class T>
cudaError_t run(const T* x, int64_t rows, int64_t n, int64_t k, bool largest, bool sorted, T* values,
                int64_t* indices, const Workspace& w, cudaStream_t stream) {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  // Enough blocks to fill the GPU (8 per SM), but at least 8 elements per thread in each.
  const int64_t max_parts = std::max<int64_t>(1, n / (kThreads * 8));
  const int bpr = static_cast<int>(std::clamp<int64_t>((int64_t{sms} * 8 + rows - 1) / rows, 1, max_parts));
  const int64_t seg = (n + bpr - 1) / bpr;
  const int64_t blocks = rows * bpr;
  if (blocks > 0x7FFFFFFF) return cudaErrorInvalidConfiguration;

  const KeySource<T> src{x, n, seg, w.cand, w.cap, (w.cap + bpr - 1) / bpr, bpr, largest};

  init_kernel<<<grid_for(rows + 1, kThreads), kThreads, 0, stream>>>(w.state, w.counters, w.cand_count, w.arrive,
                                                                     w.offsets, rows, k);
  cudaMemsetAsync(w.hist, 0, rows * kBins * sizeof(unsigned int), stream);
  // The one-read select where asked for; should its cooperative launch fail after all (e.g. a smaller shared
  // memory carveout than the occupancy assumed), the multi-pass select, reading the row in every pass.
  resident::Plan plan;
  const bool one_read = w.one_read && resident_plan<T>(rows, n, k, &plan) &&
                        (launch_resident(x, plan, largest, w, stream) == cudaSuccess || (cudaGetLastError(), false));
  if (!one_read) {
    for (int p = 0; p < kPasses; ++p) {
      hist_kernel<T><<<blocks, kThreads, 0, stream>>>(src, w.state, w.hist, kShift[p], kWidth[p]);
      choose_kernel<<<rows, kThreads, 0, stream>>>(w.state, w.hist, kShift[p], kWidth[p], p == 0, w.cap);
      if (p == 0) {
        filter_kernel<T><<<blocks, kThreads, 0, stream>>>(src, w.state, w.cand, w.cand_count, w.counters, w.keys,
                                                          k);
      }
    }
    gather_kernel<T><<<blocks, kThreads, 0, stream>>>(src, w.state, w.counters, w.keys, k);
  }
  if (sorted) {
    size_t temp_bytes = w.sort_temp_bytes;
    const cudaError_t err = cub::DeviceSegmentedSort::SortKeysDescending(
        w.sort_temp, temp_bytes, w.keys, w.sorted_keys, rows * k, rows, w.offsets, w.offsets + 1, stream);
    if (err != cudaSuccess) return err;
  }
  emit_kernel<T><<<grid_for(rows * k, kThreads), kThreads, 0, stream>>>(x, n, w.sorted_keys, rows * k, k, values,
                                                                         indices);
  return cudaGetLastError();
}

}  // namespace

bool topk_one_read(TopkDtype dtype, int64_t rows, int64_t n, int64_t k) {
  if (!opted_in("SPARSE_RETRIEVAL_TOPK_RESIDENT")) return false;
  resident::Plan plan;
  return visit_topk_dtype(dtype, [&](auto v) { return resident_plan<decltype(v)>(rows, n, k, &plan); });
}

size_t topk_workspace_bytes(int64_t rows, int64_t n, int64_t k, bool sorted, bool one_read) {
  return layout(nullptr, rows, n, k, sorted, one_read).total;
}

cudaError_t topk(const void* x, TopkDtype dtype, int64_t rows, int64_t n, int64_t k, bool largest, bool sorted,
                 bool one_read, void* values, int64_t* indices, void* workspace, size_t workspace_bytes,
                 cudaStream_t stream) {
  if (rows <= 0 || k <= 0) return cudaSuccess;
  const Workspace w = layout(workspace, rows, n, k, sorted, one_read);
  if (w.total > workspace_bytes) return cudaErrorInvalidValue;
  return visit_topk_dtype(dtype, [&](auto v) {
    using T = decltype(v);
    return run(static_cast<const T*>(x), rows, n, k, largest, sorted, static_cast<T*>(values), indices, w, stream);
  });
}

}  // namespace sr::cuda
