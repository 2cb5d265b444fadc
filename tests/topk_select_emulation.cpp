// Host emulation of the CUDA small-k top-k (csrc/kernels/cuda/topk_small.cu), built by tests/test_topk.py with the
// system C++ compiler: the same select_block and plans as the kernel, with each phase run for every thread id in a
// fresh random order (so no result may depend on the order of the shared-memory atomics), launches as loops over
// blocks, and the same two passes for split rows.
//
//   topk_select_emulation ROWS N K LARGEST BLOCKS_WANTED MIN_PART SEED < float32 rows > int64 indices
//
// Prints the plan (groups parts) on stderr.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#include "emulation.h"
#include "kernels/cuda/topk_select.h"

using namespace sr::cuda;
using namespace sr::cuda::blockselect;

template <class Src, class Out>
void launch(HostBlock& blk, const Src& src, const Out& out, const Plan& plan) {
  std::vector<Key> smem(kSmemKeys, 0x5A5A5A5A5A5A5A5Aull);  // garbage, as uninitialised shared memory
  std::vector<unsigned int> cnt(kMaxGroups, 12345u);
  const int64_t blocks = (plan.rows * plan.parts + plan.groups - 1) / plan.groups;
  for (int64_t b = 0; b < blocks; ++b) select_block(blk, smem.data(), cnt.data(), b, plan, src, out);
}

int main(int argc, char** argv) {
  if (argc != 8) {
    std::fprintf(stderr, "usage: %s ROWS N K LARGEST BLOCKS_WANTED MIN_PART SEED\n", argv[0]);
    return 2;
  }
  const int64_t rows = std::atoll(argv[1]), n = std::atoll(argv[2]);
  const int k = std::atoi(argv[3]);
  const bool largest = std::atoi(argv[4]) != 0;
  const int64_t blocks_wanted = std::atoll(argv[5]), min_part = std::atoll(argv[6]);
  std::mt19937 rng(static_cast<unsigned>(std::atoll(argv[7])));
  if (k < 1 || k > kMaxK || k > n) return 2;
  const std::vector<float> x = read_input<float>(rows * n);
  std::vector<float> values(rows * k);
  std::vector<int64_t> indices(rows * k, -1);

  HostBlock blk{&rng, kThreads};
  const Plan plan = make_plan(rows, n, k, blocks_wanted, min_part);
  std::fprintf(stderr, "%d %d\n", plan.groups, plan.parts);
  const ResultOut<float> result{x.data(), n, k, values.data(), indices.data()};
  const ValueKeys<float> src{x.data(), n, largest};
  if (plan.parts == 1) {
    launch(blk, src, result, plan);
  } else {
    const int64_t merged = int64_t{plan.parts} * k;
    std::vector<Key> part_keys(rows * merged, 0x5A5A5A5A5A5A5A5Aull);
    launch(blk, src, PartOut{part_keys.data(), k, plan.parts}, plan);
    launch(blk, StoredKeys{part_keys.data(), merged}, result, make_plan(rows, merged, k, 0, min_part));
  }
  for (size_t j = 0; j < values.size(); ++j) {  // the values must be the input's at the indices
    if (indices[j] < 0 || indices[j] >= n) return 4;
    const float v = x[(j / k) * n + indices[j]];
    if (std::memcmp(&v, &values[j], sizeof v) != 0) return 5;
  }
  std::fwrite(indices.data(), sizeof(int64_t), indices.size(), stdout);
  return 0;
}
