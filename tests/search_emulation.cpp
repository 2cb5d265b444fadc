// Host emulation of the CUDA search (csrc/kernels/cuda/search_chunk.h, launched by csrc/ops/search_cuda.cpp), built
// by tests/test_index.py with the system C++ compiler: the glue's launches (plan_launches), every
// (chunk, query) block of a launch in a fresh random order, each block phase for every thread id in a random order
// (so no result may depend on the order of the atomics), shared memory filled with garbage. ONE_LAUNCH=1 merges
// in the query's last block wherever the glue would (one launch, k <= kMaxMergeK); otherwise the candidates are
// merged here by a stable sort, as the glue does with torch.
//
//   search_emulation NSEG NQ K ONE_LAUNCH SEED
//   < per segment: int64 size, int64 nterms, int64 ptr[nterms + 1], int32 docs[nnz], float32 weights[nnz];
//     int64 qptr[NQ + 1], int64 qterms[qnnz], float32 qweights[qnnz]
//   > float32 scores[NQ x K], int64 ids[NQ x K]; "merged" or "sorted" on stderr.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "emulation.h"
#include "kernels/cuda/search_chunk.h"

using namespace sr::cuda;
using namespace sr::cuda::searchchunk;

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s NSEG NQ K ONE_LAUNCH SEED\n", argv[0]);
    return 2;
  }
  const int64_t nseg = std::atoll(argv[1]), nq = std::atoll(argv[2]), k = std::atoll(argv[3]);
  const bool one_launch_wanted = std::atoi(argv[4]) != 0;
  std::mt19937 rng(static_cast<unsigned>(std::atoll(argv[5])));
  std::vector<std::vector<int64_t>> ptrs;
  std::vector<std::vector<int32_t>> docs;
  std::vector<std::vector<float>> weights;
  std::vector<int64_t> sizes;
  for (int64_t s = 0; s < nseg; ++s) {
    const auto head = read_input<int64_t>(2);
    sizes.push_back(head[0]);
    ptrs.push_back(read_input<int64_t>(head[1] + 1));
    docs.push_back(read_input<int32_t>(ptrs.back().back()));
    weights.push_back(read_input<float>(ptrs.back().back()));
  }
  const auto qptr = read_input<int64_t>(nq + 1);
  const auto qterms = read_input<int64_t>(qptr.back());
  const auto qweights = read_input<float>(qptr.back());

  std::vector<SegmentData> segs;
  for (int64_t s = 0; s < nseg; ++s) segs.push_back({ptrs[s].data(), docs[s].data(), weights[s].data(), sizes[s]});
  const std::vector<Segments> launches = plan_launches(segs);
  const int64_t nchunks = launches.empty() ? 0 : launches[0].stride;
  std::vector<float> scores(nq * k, neg_inf());
  std::vector<int64_t> ids(nq * k, -1);
  const bool one_launch = one_launch_wanted && launches.size() == 1 && k <= kMaxMergeK;
  if (nq > 0 && k > 0 && nchunks > 0) {
    const int64_t kk = std::min<int64_t>(k, kChunk);
    std::vector<float> cand_s(nq * nchunks * kk, 12345.0f);
    std::vector<int64_t> cand_i(nq * nchunks * kk, 12345);
    std::vector<unsigned int> done(nq, 0);
    const Queries qs{qptr.data(), qterms.data(), qweights.data()};
    Output out{cand_s.data(), cand_i.data(), kk, nullptr, nullptr, nullptr, k};
    if (one_launch) {
      out.done = done.data();
      out.scores = scores.data();
      out.ids = ids.data();
    }
    HostBlock blk{&rng, kThreads};
    auto sh = std::make_unique<Shared>();
    for (const Segments& l : launches) {
      std::vector<std::pair<int64_t, int64_t>> blocks;
      for (int64_t q = 0; q < nq; ++q) {
        for (int64_t c = 0; c < l.chunks; ++c) blocks.emplace_back(c, q);
      }
      std::shuffle(blocks.begin(), blocks.end(), rng);
      for (const auto& [c, q] : blocks) {
        std::memset(sh.get(), 0x5A, sizeof(Shared));
        search_block<float>(blk, *sh, l, c, q, qs, out);
      }
    }
    if (!one_launch) {
      const int64_t m = nchunks * kk, keep = std::min(k, m);
      for (int64_t q = 0; q < nq; ++q) {
        std::vector<int64_t> order(m);
        std::iota(order.begin(), order.end(), int64_t{0});
        const float* cs = cand_s.data() + q * m;
        std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cs[a] > cs[b]; });
        for (int64_t j = 0; j < keep; ++j) {
          scores[q * k + j] = cs[order[j]];
          ids[q * k + j] = cand_i[q * m + order[j]];
        }
      }
    }
  }
  std::fprintf(stderr, one_launch ? "merged\n" : "sorted\n");
  std::fwrite(scores.data(), sizeof(float), scores.size(), stdout);
  std::fwrite(ids.data(), sizeof(int64_t), ids.size(), stdout);
  return 0;
}
