// Host emulation of the CUDA one-read radix top-k (csrc/kernels/cuda/topk_resident.h, launched by topk.cu), built
// by tests/test_topk.py with the system C++ compiler: the same plan and select_row, each block phase run for every
// thread id in a fresh random order (so no result may depend on the order of the atomics), each stage run for the
// row's blocks in a fresh random order, each block with shared memory filled with garbage, rows one after another
// (rows of a wave share nothing on the GPU).
//
//   topk_resident_emulation ROWS N K LARGEST CAPACITY RESIDENT MIN_PART SEED < float32 rows > int64 indices
//
// Prints the plan (parts grid) on stderr, or "nofit" and exits 6 when the rows do not fit.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <numeric>
#include <random>
#include <vector>

#include "emulation.h"
#include "kernels/cuda/topk_resident.h"

using namespace sr::cuda;
using namespace sr::cuda::resident;

using HostPart = Part<HostBlock, ValueCodes<float>>;

// The row's blocks, each stage run block by block in a random order; the barrier is the end of the loop.
struct HostRow {
  std::mt19937* rng;
  std::vector<HostPart>* parts;
  template <class F>
  void stage(F&& f, bool = false) {
    std::vector<size_t> order(parts->size());
    std::iota(order.begin(), order.end(), size_t{0});
    std::shuffle(order.begin(), order.end(), *rng);
    for (size_t b : order) f((*parts)[b]);
  }
  const State& state(int p) const { return (*parts)[0].sh.st[p]; }
};

int main(int argc, char** argv) {
  if (argc != 9) {
    std::fprintf(stderr, "usage: %s ROWS N K LARGEST CAPACITY RESIDENT MIN_PART SEED\n", argv[0]);
    return 2;
  }
  const int64_t rows = std::atoll(argv[1]), n = std::atoll(argv[2]), k = std::atoll(argv[3]);
  const bool largest = std::atoi(argv[4]) != 0;
  const int64_t capacity = std::atoll(argv[5]), resident = std::atoll(argv[6]), min_part = std::atoll(argv[7]);
  std::mt19937 rng(static_cast<unsigned>(std::atoll(argv[8])));
  if (k < 1 || k > n) return 2;
  Plan plan;
  if (!make_plan(rows, n, k, capacity, resident, min_part, &plan)) {
    std::fprintf(stderr, "nofit\n");
    return 6;
  }
  std::fprintf(stderr, "%d %lld\n", plan.parts, static_cast<long long>(plan.grid));
  if (plan.grid % plan.parts != 0 || plan.grid > resident || plan.seg > capacity) return 7;
  const std::vector<float> x = read_input<float>(rows * n);
  const ValueCodes<float> src{x.data(), n, largest};

  constexpr unsigned int kGarbage = 0x5A5A5A5Au;
  std::vector<unsigned int> hist(kPasses * kBins), ties(kMaxParts, kGarbage), count(1);
  std::vector<Key> keys(k);
  std::vector<HostBlock> blocks(plan.parts, HostBlock{&rng, kThreads});
  std::vector<Shared> shared(plan.parts);
  std::vector<std::vector<unsigned int>> codes(plan.parts, std::vector<unsigned int>(capacity, kGarbage));
  std::vector<int64_t> indices(rows * k);
  for (int64_t r = 0; r < rows; ++r) {
    std::fill(hist.begin(), hist.end(), 0u);
    count[0] = 0;
    std::fill(keys.begin(), keys.end(), Key{0});
    const RowGlobal g{hist.data(), ties.data(), count.data(), keys.data()};
    std::vector<HostPart> parts;
    for (int b = 0; b < plan.parts; ++b) {
      std::memset(&shared[b], 0x5A, sizeof(Shared));
      const int64_t lo = b * plan.seg, len = std::min(plan.seg, n - lo);
      parts.push_back(HostPart{blocks[b], shared[b], codes[b].data(), src, g, r, lo, len, b, plan.parts,
                               static_cast<int>(k)});
    }
    HostRow row{&rng, &parts};
    select_row(row);
    if (count[0] != static_cast<unsigned int>(k)) {
      std::fprintf(stderr, "row %lld: %u keys written, want %lld\n", static_cast<long long>(r), count[0],
                   static_cast<long long>(k));
      return 4;
    }
    std::sort(keys.begin(), keys.end(), std::greater<Key>());
    for (int64_t j = 0; j < k; ++j) indices[r * k + j] = key_index(keys[j]);
  }
  std::fwrite(indices.data(), sizeof(int64_t), indices.size(), stdout);
  return 0;
}
