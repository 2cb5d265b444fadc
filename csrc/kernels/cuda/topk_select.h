// One-pass block selection of the k <= 256 best 64-bit keys of a row (see topk_small.cu), written once for the
// GPU and for a host emulation (tests/topk_select_emulation.cpp): a block's work is a sequence of phases between
// barriers, run by a Block policy - on the device each thread runs the phase for its own id and then waits at
// __syncthreads; the host emulation runs the phase for every thread id in turn. Also the 64-bit keys shared with
// the radix select: (order code of the value << 32) | (0xFFFFFFFF - index), so the k largest keys are the top-k
// with ties to the lower index. This header compiles without CUDA.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels/cuda/host_device.h"

namespace sr::cuda {

using Key = unsigned long long;

// Same codes as kernels/cpu/topk.cpp: NaN above +inf, -0 equal to +0, inverted for smallest-first. Never 0 in a
// key, so 0 is an empty slot below every key.
SR_HD unsigned int order_code(float v, bool largest) {
  unsigned int c = 0xFFFFFFFFu;
  if (v == v) {
    unsigned int b;
#if defined(__CUDA_ARCH__)
    b = __float_as_uint(v);
#else
    std::memcpy(&b, &v, sizeof b);
#endif
    if (b == 0x80000000u) b = 0;
    c = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  }
  return largest ? c : ~c;
}

SR_HD Key make_key(float v, unsigned int i, bool largest) {
  return (static_cast<Key>(order_code(v, largest)) << 32) | (0xFFFFFFFFu - i);
}

SR_HD int64_t key_index(Key key) { return 0xFFFFFFFFu - static_cast<unsigned int>(key); }

namespace blockselect {

constexpr int kThreads = 256;
constexpr int kPerThread = 8;   // elements each thread loads per tile
constexpr int kSmemKeys = 4096;  // 32 KB of keys per block, split evenly between its groups
constexpr int kMaxGroups = 8;
constexpr int kMaxK = 256;
static_assert(kMaxK <= kThreads, "seeding takes the k-th best of the threads' maxima");
constexpr int64_t kMinPart = 16384;  // a row is split into parts of at least this many elements
static_assert(kSmemKeys / kMaxGroups - kMaxK >= kThreads / kMaxGroups * kPerThread,
              "a group's buffer must hold at least one tile");

// How a launch covers the rows: `groups` rows (or parts of rows) per block, each row cut into `parts` parts of
// `seg` elements. A block's group g handles unit u = block * groups + g: part u % parts of row u / parts.
struct Plan {
  int64_t rows, n, seg;
  int k, K;  // K: queue length, k rounded up to a power of two (at least 32)
  int groups, parts;
};

// Several rows per block when a row fits one group's tile; one row per block otherwise, cut into parts when there
// are too few rows to give `blocks_wanted` blocks. Every group's buffer (kSmemKeys / groups - K keys) then holds at
// least one tile (kThreads / groups * kPerThread keys) for every K <= kMaxK.
inline Plan make_plan(int64_t rows, int64_t n, int k, int64_t blocks_wanted, int64_t min_part = kMinPart) {
  Plan p{rows, n, n, k, 32, 1, 1};
  while (p.K < k) p.K *= 2;
  const int64_t tile = kThreads * kPerThread;
  while (p.groups < kMaxGroups && n <= tile / (2 * p.groups)) p.groups *= 2;
  if (p.groups == 1 && rows < blocks_wanted) {
    const int64_t want = (blocks_wanted + rows - 1) / rows, most = n / min_part;
    p.parts = static_cast<int>(want < most ? want : most < 1 ? 1 : most);
    p.seg = (n + p.parts - 1) / p.parts;
  }
  return p;
}

// Sorts each group's keys smem[g * C + from, + P) best first (bitonic, in shared memory; P a power of two).
template <class Block>
SR_HD void sort_groups(Block& blk, Key* smem, int G, int from, int P) {
  const int TG = kThreads / G, C = kSmemKeys / G;
  for (int size = 2; size <= P; size *= 2) {
    for (int stride = size / 2; stride > 0; stride /= 2) {
      blk.each([&](int t) {
        Key* q = smem + (t / TG) * C + from;
        for (int j = t % TG; j < P / 2; j += TG) {
          const int i = 2 * j - (j & (stride - 1));
          const Key a = q[i], b = q[i + stride];
          if ((i & size) == 0 ? a < b : a > b) {
            q[i] = b;
            q[i + stride] = a;
          }
        }
      });
    }
  }
}

// The selection of one block. Each group keeps, in its slice of `smem`, a queue of the K best keys seen so far,
// sorted best first, followed by a buffer. A tile loads kPerThread elements per thread and appends the keys
// beating the queue's k-th key (the running threshold) to the buffer. Once a buffer holds more than 2K keys (or
// could overflow on the next tile), and after the last tile, every group sorts queue + buffer, which leaves the
// new K best at the front. Then the queue's first k keys go out best first through out.write(row, part, j, key).
// `cnt` holds kMaxGroups buffer lengths in shared memory.
//
// A block with one group and several tiles first seeds its queue: the k-th best of its threads' maxima over the
// first tile is beaten or matched by at least k keys, so the queue starts as K copies of the key just below it.
// Only those k keys and better ones pass the first tile (instead of all of it), and the copies never come out.
template <class Block, class Src, class Out>
SR_HD void select_block(Block& blk, Key* smem, unsigned int* cnt, int64_t block, const Plan& p, const Src& src,
                        const Out& out) {
  const int G = p.groups, TG = kThreads / G, C = kSmemKeys / G, K = p.K, tile = TG * kPerThread;
  const unsigned int merge_above = 2 * K < C - K - tile ? 2 * K : C - K - tile;
  const int64_t tiles = (p.seg + tile - 1) / tile;
  // Each thread's unit: row, part and the part's bounds; r == p.rows marks a group without work.
  struct Unit {
    int64_t r, part, lo, hi;
  };
  const auto unit = [&](int g) {
    const int64_t u = block * G + g, r = p.parts == 1 ? u : u / p.parts, part = u - r * p.parts;
    const int64_t lo = part * p.seg, end = lo + p.seg;
    return r < p.rows ? Unit{r, part, lo, end < p.n ? end : p.n} : Unit{p.rows, 0, 0, 0};
  };
  // Thread t's keys of tile tl, 0 past the end.
  const auto load = [&](int t, int64_t tl, Key* keys) {
    const Unit w = unit(t / TG);
    const int64_t base = w.lo + tl * tile + t % TG;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int e = 0; e < kPerThread; ++e) {
      const int64_t i = base + int64_t{e} * TG;
      keys[e] = i < w.hi ? src.key(w.r, i) : 0;
    }
  };
  const bool seed = G == 1 && tiles > 1;
  if (seed) {
    blk.each([&](int t) {
      Key keys[kPerThread];
      load(t, 0, keys);
      Key best = 0;
      for (int e = 0; e < kPerThread; ++e) best = keys[e] > best ? keys[e] : best;
      smem[K + t] = best;
    });
    sort_groups(blk, smem, 1, K, kThreads);
  }
  blk.each([&](int t) {
    const int g = t / TG;
    const Key below = seed && smem[K + p.k - 1] > 0 ? smem[K + p.k - 1] - 1 : 0;
    for (int j = t % TG; j < K; j += TG) smem[g * C + j] = below;
    if (t % TG == 0) cnt[g] = 0;
  });
  for (int64_t tl = 0; tl < tiles; ++tl) {
    // The barrier's OR tells every thread whether some buffer is due for a merge.
    const bool full = blk.each_or([&](int t) {
      const int g = t / TG;
      Key* q = smem + g * C;
      const Key thresh = q[p.k - 1];
      Key keys[kPerThread];
      load(t, tl, keys);
      unsigned int used = 0;
      for (int e = 0; e < kPerThread; ++e) {
        if (keys[e] > thresh) {
          const unsigned int slot = blk.atomic_add(&cnt[g], 1u);
          q[K + slot] = keys[e];
          used = slot + 1;
        }
      }
      return used > merge_above;
    });
    if (full || tl + 1 == tiles) {
      // cnt is only read from here to the reset below, which follows at least two barriers.
      unsigned int most = 0;
      for (int g = 0; g < G; ++g) most = cnt[g] > most ? cnt[g] : most;
      if (most == 0) continue;
      int P = 2 * K;
      while (P < K + static_cast<int>(most)) P *= 2;
      blk.each([&](int t) {
        const int g = t / TG;
        for (int j = K + static_cast<int>(cnt[g]) + t % TG; j < P; j += TG) smem[g * C + j] = 0;
      });
      sort_groups(blk, smem, G, 0, P);
      blk.each([&](int t) {
        if (t % TG == 0) cnt[t / TG] = 0;
      });
    }
  }
  blk.each([&](int t) {
    const int g = t / TG;
    const Unit w = unit(g);
    if (w.r == p.rows) return;
    for (int j = t % TG; j < p.k; j += TG) out.write(w.r, w.part, j, smem[g * C + j]);
  });
}

// Keys of rows of values.
template <class T>
struct ValueKeys {
  const T* x;
  int64_t n;
  bool largest;
  SR_HD Key key(int64_t r, int64_t i) const {
    return make_key(to_float(x[r * n + i]), static_cast<unsigned int>(i), largest);
  }
};

// Keys already made: the parts' results, `n` per row.
struct StoredKeys {
  const Key* keys;
  int64_t n;
  SR_HD Key key(int64_t r, int64_t i) const { return keys[r * n + i]; }
};

// A part's k best keys (0 where the part had fewer), for the second pass.
struct PartOut {
  Key* keys;
  int64_t k;
  int parts;
  SR_HD void write(int64_t r, int64_t part, int64_t j, Key key) const { keys[(r * parts + part) * k + j] = key; }
};

// The result: value (the input's own bits) and index of each key.
template <class T>
struct ResultOut {
  const T* x;
  int64_t n, k;
  T* values;
  int64_t* indices;
  SR_HD void write(int64_t r, int64_t, int64_t j, Key key) const {
    const int64_t i = key_index(key);
    values[r * k + j] = x[r * n + i];
    indices[r * k + j] = i;
  }
};

}  // namespace blockselect
}  // namespace sr::cuda
