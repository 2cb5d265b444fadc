// One-read radix top-k (opt-in, see topk.h): the `parts` blocks that share a row load its order codes once into
// their shared memory, where they stay for every pass. Digits of 8 bits from the top; a pass stops the row early
// when the chosen bucket holds exactly the keys still needed; otherwise, after the fourth digit, the k-th value's
// ties go to the lowest indices by their rank over the row (so no index passes). The blocks of a row add their
// histograms and tie counts in global memory and meet at row barriers between stages; a launch never holds more
// blocks than can be resident at once, so the barriers cannot deadlock, and covers the rows in waves.
//
// Written once for the GPU (topk.cu) and for a host emulation (tests/topk_resident_emulation.cpp), like
// topk_select.h: a Block policy runs each phase for every thread (then __syncthreads on the device), and a Row
// policy runs each stage for every block of the row (then the row barrier on the device). Compiles without CUDA.
#pragma once

#include <cstdint>

#include "kernels/cuda/topk_select.h"  // Key, order_code, to_float

namespace sr::cuda::resident {

constexpr int kThreads = 512;
constexpr int kBins = 256;
constexpr int kPasses = 4;
constexpr int kMaxParts = 64;
// Codes held per block: 96 KB of shared memory, two blocks per SM on sm_90.
constexpr int64_t kCapacity = 24576;
// A row is cut into more parts than it needs (to fill the GPU when rows are few) only down to this many elements.
constexpr int64_t kMinPart = 4096;

// Unit u = block + wave * grid is part u % parts of row u / parts; grid is a multiple of parts, so the blocks of
// a row run together.
struct Plan {
  int64_t rows, n, seg, grid;
  int k, parts;
};

// False when a row does not fit the shared memory of kMaxParts blocks, or of the `resident` blocks the GPU holds.
inline bool make_plan(int64_t rows, int64_t n, int64_t k, int64_t capacity, int64_t resident, int64_t min_part,
                      Plan* plan) {
  if (rows <= 0 || n <= 0 || capacity <= 0 || min_part <= 0) return false;
  int64_t parts = (n + capacity - 1) / capacity;
  if (parts > kMaxParts || parts > resident) return false;
  if (rows * parts < resident) {
    int64_t more = resident / rows;
    more = more < n / min_part ? more : n / min_part;
    more = more < kMaxParts ? more : kMaxParts;
    parts = parts > more ? parts : more;
  }
  const int64_t seg = (n + parts - 1) / parts;
  parts = (n + seg - 1) / seg;  // no empty part
  const int64_t grid = rows * parts < resident / parts * parts ? rows * parts : resident / parts * parts;
  *plan = Plan{rows, n, seg, grid, static_cast<int>(k), static_cast<int>(parts)};
  return true;
}

// The row's search so far: the top bits of the k-th best code (prefix under mask), how many codes sharing them
// are still needed, and whether all of those are (the bucket is exactly that size).
struct State {
  unsigned int prefix, mask, k_rem, done;
};

// A block's shared memory besides its codes; st[p] is the state before pass p (st[0] the start).
struct Shared {
  unsigned int hist[kBins];
  unsigned int scan[2][kThreads];
  State st[kPasses + 1];
};

// A row's slices of the workspace: histograms of every pass (zeroed), tie counts of its parts, the output slots
// taken (zeroed), and its k keys in any order.
struct RowGlobal {
  unsigned int* hist;
  unsigned int* ties;
  unsigned int* count;
  Key* keys;
};

// Order codes of rows of values.
template <class T>
struct ValueCodes {
  const T* x;
  int64_t n;
  bool largest;
  SR_HD unsigned int code(int64_t r, int64_t i) const { return order_code(to_float(x[r * n + i]), largest); }
};

// Inclusive prefix sums of sh.scan[0][0, n) (n a power of two <= kThreads); returns the buffer that holds them.
template <class Block>
SR_HD int scan_inclusive(Block& blk, Shared& sh, int n) {
  int from = 0;
  for (int off = 1; off < n; off *= 2) {
    blk.each([&](int t) {
      if (t < n) sh.scan[1 - from][t] = sh.scan[from][t] + (t >= off ? sh.scan[from][t - off] : 0u);
    });
    from = 1 - from;
  }
  return from;
}

// The buffer in which scan_inclusive leaves the sums of kThreads values: one swap per doubling.
constexpr int kTieScan = [] {
  int from = 0;
  for (int off = 1; off < kThreads; off *= 2) from = 1 - from;
  return from;
}();

// One block's part of a row: elements [lo, lo + len) held as codes in shared memory.
template <class Block, class Src>
struct Part {
  Block& blk;
  Shared& sh;
  unsigned int* codes;
  const Src& src;
  RowGlobal g;
  int64_t row, lo, len;
  int part, parts, k;

  SR_HD void put(unsigned int code, int64_t i) {
    const unsigned int slot = blk.atomic_add(g.count, 1u);
    if (slot < static_cast<unsigned int>(k)) g.keys[slot] = (static_cast<Key>(code) << 32) | (0xFFFFFFFFu - i);
  }

  // Loads the codes and counts their first digit.
  SR_HD void load() {
    blk.each([&](int t) {
      for (int j = t; j < kBins; j += kThreads) sh.hist[j] = 0;
      if (t == 0) sh.st[0] = State{0u, 0u, static_cast<unsigned int>(k), 0u};
    });
    blk.each([&](int t) {
      for (int64_t i = t; i < len; i += kThreads) {
        const unsigned int c = src.code(row, lo + i);
        codes[i] = c;
        blk.atomic_add(&sh.hist[c >> 24], 1u);
      }
    });
  }

  // Counts digit `pass` (>= 1) of the codes that match the state's prefix.
  SR_HD void count(int pass) {
    blk.each([&](int t) {
      for (int j = t; j < kBins; j += kThreads) sh.hist[j] = 0;
    });
    blk.each([&](int t) {
      const State s = sh.st[pass];
      const int shift = 24 - 8 * pass;
      for (int64_t i = t; i < len; i += kThreads) {
        const unsigned int c = codes[i];
        if ((c & s.mask) == s.prefix) blk.atomic_add(&sh.hist[(c >> shift) & 0xFFu], 1u);
      }
    });
  }

  // Adds the block's histogram to the row's (a row of one part keeps its own).
  SR_HD void publish(int pass) {
    if (parts == 1) return;
    blk.each([&](int t) {
      for (int j = t; j < kBins; j += kThreads) {
        if (sh.hist[j]) blk.atomic_add(&g.hist[pass * kBins + j], sh.hist[j]);
      }
    });
  }

  // Picks the digit of `pass` that holds the k_rem-th best matching code: st[pass + 1].
  SR_HD void choose(int pass) {
    blk.each([&](int t) {
      if (t < kBins) {
        const int j = kBins - 1 - t;  // best digit first
        sh.scan[0][t] = parts == 1 ? sh.hist[j] : blk.load(&g.hist[pass * kBins + j]);
      }
    });
    const int from = scan_inclusive(blk, sh, kBins);
    blk.each([&](int t) {
      if (t >= kBins) return;
      const State s = sh.st[pass];
      const unsigned int incl = sh.scan[from][t], excl = t > 0 ? sh.scan[from][t - 1] : 0u;
      if (excl < s.k_rem && incl >= s.k_rem) {
        const int shift = 24 - 8 * pass;
        const unsigned int digit = static_cast<unsigned int>(kBins - 1 - t);
        State next{s.prefix | (digit << shift), s.mask | (0xFFu << shift), s.k_rem - excl, 0u};
        next.done = incl - excl == next.k_rem;
        sh.st[pass + 1] = next;
      }
    });
  }

  // The codes equal to the k-th (st[kPasses], not done): each thread counts those of its contiguous run; the
  // block's prefix sums stay in sh.scan[kTieScan] for emit, the block's total goes to the row.
  SR_HD void count_ties() {
    const int64_t per = (len + kThreads - 1) / kThreads;
    blk.each([&](int t) {
      const unsigned int tie = sh.st[kPasses].prefix;
      unsigned int c = 0;
      for (int64_t i = t * per, end = i + per < len ? i + per : len; i < end; ++i) c += codes[i] == tie;
      sh.scan[0][t] = c;
    });
    const int from = scan_inclusive(blk, sh, kThreads);
    blk.each([&](int t) {
      if (t == 0) g.ties[part] = sh.scan[from][kThreads - 1];
    });
  }

  // Writes the part's keys of the top-k: every code above the final state's bucket, the bucket too when done,
  // otherwise the ties whose rank over the row (parts before this one, then threads' runs) is below k_rem.
  SR_HD void emit(int last) {
    blk.each([&](int t) {
      const State s = sh.st[last];
      if (s.done) {
        for (int64_t i = t; i < len; i += kThreads) {
          if ((codes[i] & s.mask) >= s.prefix) put(codes[i], lo + i);
        }
        return;
      }
      for (int64_t i = t; i < len; i += kThreads) {
        if (codes[i] > s.prefix) put(codes[i], lo + i);
      }
      unsigned int rank = t > 0 ? sh.scan[kTieScan][t - 1] : 0u;
      for (int q = 0; q < part; ++q) rank += blk.load(&g.ties[q]);
      const int64_t per = (len + kThreads - 1) / kThreads;
      for (int64_t i = t * per, end = i + per < len ? i + per : len; i < end && rank < s.k_rem; ++i) {
        if (codes[i] == s.prefix) {
          put(codes[i], lo + i);
          ++rank;
        }
      }
    });
  }
};

// The k best keys of a row, in any order, through row.stage(f) (f(Part&) on every block of the row, then a row
// barrier unless `last`) and row.state(p) (st[p], the same in every block).
template <class Row>
SR_HD void select_row(Row& row) {
  row.stage([](auto& b) {
    b.load();
    b.publish(0);
  });
  int last = kPasses;
  for (int pass = 0; pass < kPasses; ++pass) {
    row.stage([pass](auto& b) {
      b.choose(pass);
      if (b.sh.st[pass + 1].done) return;
      if (pass + 1 < kPasses) {
        b.count(pass + 1);
        b.publish(pass + 1);
      } else {
        b.count_ties();
      }
    });
    if (row.state(pass + 1).done) {
      last = pass + 1;
      break;
    }
  }
  row.stage([last](auto& b) { b.emit(last); }, true);
}

}  // namespace sr::cuda::resident
