// Host emulation of the fused CUDA CQ attention (csrc/kernels/cuda/cq.cu), built by tests/test_cq.py with the
// system C++ compiler: the same plan and block phases (cq_fused.h), each phase run for every thread id in a fresh
// random order (so no result may depend on the order of the shared-memory atomics), launches as loops over blocks.
//
//   cq_fused_emulation CODE_BYTES B HQ HKV TQ D G K T W SCALE HAS_STARTS THREADS SHARED_LIMIT BLOCKS_WANTED
//                      MIN_SPLIT SEED
//   < q f32 (B,HQ,TQ,D), k codes, v codes (B,HKV,T,D/G), k books, v books f32 (HKV*D/G,K,G),
//     k recent, v recent f32 (B,HKV,W,D), lengths i64 (B), [starts i64 (B,TQ)]
//   > out f32 (B,HQ,TQ,D); the plan (rows per block, chunks, splits, channels per thread, code words) on stderr.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <type_traits>
#include <vector>

#include "emulation.h"
#include "kernels/cuda/cq_fused.h"

using namespace sr::cuda;

// The fused kernel's Block policy adds a block-wide max and each thread's registers.
struct CqHostBlock : HostBlock {
  void block_max(uint32_t* p, uint32_t v) { *p = std::max(*p, v); }
  std::vector<cqfused::Regs> thread_regs = std::vector<cqfused::Regs>(threads);
  cqfused::Regs& regs(int t) { return thread_regs[t]; }
};

int main(int argc, char** argv) {
  if (argc != 18) {
    std::fprintf(stderr, "usage: see the comment at the top of cq_fused_emulation.cpp\n");
    return 2;
  }
  auto arg = [&](int i) { return std::atoll(argv[i]); };
  const int code_bytes = static_cast<int>(arg(1));
  const int64_t B = arg(2), Hq = arg(3), Hkv = arg(4), Tq = arg(5), D = arg(6), g = arg(7), K = arg(8), T = arg(9),
                W = arg(10);
  const float scale = static_cast<float>(std::atof(argv[11]));
  const bool has_starts = arg(12) != 0;
  const int threads = static_cast<int>(arg(13));
  const size_t shared_limit = static_cast<size_t>(arg(14));
  const int64_t blocks_wanted = arg(15), min_split = arg(16);
  std::mt19937 rng(static_cast<unsigned>(arg(17)));
  const int64_t G = D / g;

  auto q = read_input<float>(B * Hq * Tq * D);
  auto kc = read_input<unsigned char>(B * Hkv * T * G * code_bytes);
  auto vc = read_input<unsigned char>(B * Hkv * T * G * code_bytes);
  auto kb = read_input<float>(Hkv * G * K * g);
  auto vb = read_input<float>(Hkv * G * K * g);
  auto kr = read_input<float>(B * Hkv * W * D);
  auto vr = read_input<float>(B * Hkv * W * D);
  auto lengths = read_input<int64_t>(B);
  auto starts = read_input<int64_t>(has_starts ? B * Tq : 0);
  std::vector<float> out(B * Hq * Tq * D, -1.f);

  CqAttentionArgs a{};
  a.q = q.data();
  a.B = B;
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.Tq = Tq;
  a.D = D;
  a.g = g;
  a.k = K;
  a.k_codes = kc.data();
  a.v_codes = vc.data();
  a.code_bytes = code_bytes;
  a.stride_b = Hkv * T * G;
  a.stride_h = T * G;
  a.t_coded = T;
  a.lengths = lengths.data();
  a.starts = has_starts ? starts.data() : nullptr;
  a.k_books = kb.data();
  a.v_books = vb.data();
  a.k_recent = kr.data();
  a.v_recent = vr.data();
  a.w = W;
  a.scale = scale;
  a.out = out.data();

  const cqfused::Plan p = cqfused::make_plan(a, threads, shared_limit, blocks_wanted, min_split);
  std::fprintf(stderr, "%lld %lld %lld %d %d\n", static_cast<long long>(p.rows_per_block),
               static_cast<long long>(p.chunks), static_cast<long long>(p.splits), p.vec, p.code_words);
  if (p.rows_per_block == 0) return 3;
  const int64_t rows = B * Hkv * p.R;
  // NaN-filled, so that anything a block should write and does not shows up in the result.
  std::vector<float> part_ml(rows * p.splits * 2, NAN), part_o(rows * p.splits * D, NAN);
  std::vector<unsigned char> shared(p.shared_bytes);
  CqHostBlock blk{{&rng, threads}};
  for (int64_t block = 0; block < B * Hkv * p.chunks * p.splits; ++block) {
    std::fill(shared.begin(), shared.end(), 0xFF);
    auto run = [&](auto code, auto vec, auto words) {
      cqfused::coded_split<decltype(code), decltype(vec)::value, decltype(words)::value>(
          blk, a, p, block, shared.data(), part_o.data(), part_ml.data());
    };
    auto with_vec = [&](auto code, auto words) {
      p.vec == 4 ? run(code, std::integral_constant<int, 4>{}, words) : run(code, std::integral_constant<int, 1>{}, words);
    };
    if (code_bytes == 2) {
      with_vec(int16_t{}, std::integral_constant<int, 0>{});
    } else if (p.code_words == 1) {
      with_vec(uint8_t{}, std::integral_constant<int, 1>{});
    } else if (p.code_words == 2) {
      with_vec(uint8_t{}, std::integral_constant<int, 2>{});
    } else {
      with_vec(uint8_t{}, std::integral_constant<int, 0>{});
    }
  }
  std::vector<float> scratch(2 * W + p.splits, NAN);
  for (int64_t row = 0; row < rows; ++row) {
    cqfused::merge_row(blk, a, p, row, scratch.data(), part_o.data(), part_ml.data());
  }
  std::fwrite(out.data(), sizeof(float), out.size(), stdout);
  return 0;
}
