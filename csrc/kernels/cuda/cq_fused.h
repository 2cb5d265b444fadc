// Fused decode attention from CQ codes (flash-decoding style), written once for the GPU (kernels/cuda/cq.cu) and
// for a host emulation (tests/cq_fused_emulation.cpp). A block's work is a sequence of phases between barriers,
// run by a Block policy: on the device each thread runs the phase for its own id and waits at __syncthreads; the
// emulation runs the phase for every thread id in a random order. blk.block_max(p, v) is called by every thread
// of the block (the device reduces over each warp before one shared atomicMax). This header compiles without CUDA.
//
// Launch 1, one block per (batch, kv head, chunk of up to kMaxRows query rows, context split): the rows' tables of
// scale * q . key centroid per (group, code) and the kv head's value codebook go to shared memory; the split's coded
// tokens are scored by table lookups a tile at a time, and each token's softmax weight times its value centroids
// (gathered from shared memory) is accumulated in registers, rescaled when a tile raises a row's running maximum.
// (Accumulating weights per (group, code) bucket instead needs shared float atomics, which sm_90 emulates with a
// compare-and-swap loop: that version, with 64-bit index arithmetic too, was 2.5x slower.) The split writes its
// (max, sum of weights, unnormalised output) per row. Launch 2, one block per query row: the full-precision window
// and the splits are merged by log-sum-exp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kernels/cuda/host_device.h"

namespace sr::cuda {

struct CqAttentionArgs {
  const float* q;  // (B, Hq, Tq, D)
  int64_t B, Hq, Hkv, Tq, D, g, k;
  const void* k_codes;  // (T, G) blocks of each (b, h) at b * stride_b + h * stride_h elements
  const void* v_codes;
  int code_bytes;
  int64_t stride_b, stride_h, t_coded;
  const int64_t* lengths;  // (B,), or null: every sequence has t_coded tokens
  const int64_t* starts;   // (B, Tq) first position of [coded, window] each query sees, or null
  const float* k_books;    // (Hkv * G, k, g)
  const float* v_books;
  const float* k_recent;  // (B, Hkv, W, D) or null
  const float* v_recent;
  int64_t w;
  float scale;
  float* out;  // (B, Hq, Tq, D)
};

namespace cqfused {

constexpr int kMaxRows = 8;  // query rows per block: their accumulators live in registers

// Rows r = (query head within the kv head's group) * Tq + query token: R rows per (batch, kv head).
struct Plan {
  int64_t R = 0, G = 0;
  int64_t rows_per_block = 0;  // 0: does not fit in shared memory (use the multi-pass kernels)
  int64_t chunks = 0, splits = 0, split_len = 0;
  int threads = 0;  // also the tokens per tile
  int vec = 1;      // channels per thread in the value pass: 4 (float4 loads) when the group size allows
  int subsets = 0;  // the value pass splits a tile's tokens into threads / (D / vec) subsets
  int code_words = 0;  // 1 or 2: a token's uint8 codes are 16 or 32 aligned bytes, read as vectors; 0 otherwise
  size_t shared_bytes = 0;
};

// Byte offsets in a block's shared memory: the kv head's value codebook (G, K, g), the rows' tables
// lut[(j * K + c) * rows + i] (reused at the end for the subsets' partial outputs), the tile's weights
// [token * rows + i] and value codes [token * G + j], then per-row state.
struct Layout {
  int64_t vbook, lut, weights, codes, rows, total;
};

SR_HD int64_t align16(int64_t n) { return (n + 15) / 16 * 16; }

SR_HD Layout layout_for(int64_t rows, int64_t G, int64_t K, int64_t D, int threads, int subsets, int code_bytes) {
  Layout l;
  l.vbook = 0;
  l.lut = align16(l.vbook + 4 * K * D);
  const int64_t lut_floats = G * K * rows > subsets * rows * (D + 1) ? G * K * rows : subsets * rows * (D + 1);
  l.weights = align16(l.lut + 4 * lut_floats);
  l.codes = align16(l.weights + 4 * threads * rows);
  l.rows = align16(l.codes + static_cast<int64_t>(code_bytes) * threads * G);
  l.total = l.rows + rows * (2 * 8 + 2 * 4 + 4);
  return l;
}

// blocks_wanted: blocks that fill the GPU; min_split: fewest coded tokens per split (a split's set-up costs about
// as much as scoring a thousand tokens).
inline Plan make_plan(const CqAttentionArgs& a, int threads, size_t shared_limit, int64_t blocks_wanted,
                      int64_t min_split) {
  Plan p;
  p.R = a.Hq / a.Hkv * a.Tq;
  p.G = a.D / a.g;
  p.threads = threads;
  p.vec = a.g % 4 == 0 ? 4 : 1;
  const int64_t lanes = a.D / p.vec;
  if (lanes > threads) return p;
  p.subsets = static_cast<int>(threads / lanes);
  const bool aligned = (reinterpret_cast<uintptr_t>(a.k_codes) | reinterpret_cast<uintptr_t>(a.v_codes) |
                        static_cast<uintptr_t>(a.stride_b) | static_cast<uintptr_t>(a.stride_h)) % 16 == 0;
  if (a.code_bytes == 1 && aligned && (p.G == 16 || p.G == 32)) p.code_words = static_cast<int>(p.G / 16);
  auto bytes = [&](int64_t rows) {
    return static_cast<size_t>(layout_for(rows, p.G, a.k, a.D, threads, p.subsets, a.code_bytes).total);
  };
  int64_t fit = 0;
  while (fit < std::min<int64_t>(p.R, kMaxRows) && bytes(fit + 1) <= shared_limit) ++fit;
  if (fit == 0) return p;
  p.chunks = (p.R + fit - 1) / fit;
  p.rows_per_block = (p.R + p.chunks - 1) / p.chunks;
  p.shared_bytes = bytes(p.rows_per_block);
  const int64_t T = a.t_coded, blocks = a.B * a.Hkv * p.chunks;
  const int64_t max_splits = std::max<int64_t>(1, (T + min_split - 1) / min_split);
  const int64_t splits = std::clamp<int64_t>((blocks_wanted + blocks - 1) / blocks, 1, max_splits);
  p.split_len = T > 0 ? (T + splits - 1) / splits : 0;
  p.splits = T > 0 ? (T + p.split_len - 1) / p.split_len : 1;
  return p;
}

// 16 bytes of codes, read and written as one vector on the device.
struct alignas(16) Words {
  uint32_t w[4];
};

SR_HD Words load_words(const void* p) {
#if defined(__CUDA_ARCH__)
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  return Words{{v.x, v.y, v.z, v.w}};
#else
  Words x;
  std::memcpy(x.w, p, sizeof x.w);
  return x;
#endif
}

SR_HD void store_words(void* p, const Words& x) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(p) = make_uint4(x.w[0], x.w[1], x.w[2], x.w[3]);
#else
  std::memcpy(p, x.w, sizeof x.w);
#endif
}

SR_HD int byte_of(const Words* x, int j) { return (x[j >> 4].w[(j >> 2) & 3] >> ((j & 3) * 8)) & 0xFF; }

// One thread's state kept across tiles (registers on the device): the value pass's accumulators, and the next
// tile's codes, loaded while this tile is processed.
struct Regs {
  float o[kMaxRows][4];
  float l[kMaxRows];
  Words next_k[2], next_v[2];
};

SR_HD int64_t imin(int64_t x, int64_t y) { return x < y ? x : y; }
SR_HD int64_t imax(int64_t x, int64_t y) { return x > y ? x : y; }
SR_HD float fmax_(float x, float y) { return x > y ? x : y; }

// N floats from 16-byte aligned shared memory (one vector load on the device when N is 4).
template <int N>
SR_HD void load(const float* p, float* out) {
#if defined(__CUDA_ARCH__)
  if constexpr (N == 4) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
  } else
#endif
  {
    for (int v = 0; v < N; ++v) out[v] = p[v];
  }
}

// A monotone map of floats to unsigned ints, so that the tile maximum is an integer atomicMax.
SR_HD uint32_t order_bits(float v) {
#if defined(__CUDA_ARCH__)
  const uint32_t b = __float_as_uint(v);
#else
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
#endif
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
SR_HD float from_order_bits(uint32_t u) {
  const uint32_t b = (u & 0x80000000u) ? (u & 0x7FFFFFFFu) : ~u;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float v;
  std::memcpy(&v, &b, sizeof v);
  return v;
#endif
}
SR_HD float exp_of(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return std::exp(x);
#endif
}

// Coded positions [c0, c1) that row r of sequence b sees: Tq queries sit at the last Tq positions of
// [coded, window], causal, from starts[b, t] on (same rule as kernels/cpu/cq.cpp).
SR_HD void coded_range(const CqAttentionArgs& a, int64_t b, int64_t r, int64_t* c0, int64_t* c1) {
  const int64_t t = r % a.Tq, qpos = a.t_coded + a.w - a.Tq + t;
  const int64_t length = a.lengths != nullptr ? a.lengths[b] : a.t_coded;
  const int64_t n = imin(imax(imin(length, qpos + 1), 0), a.t_coded);
  const int64_t start = a.starts != nullptr ? a.starts[b * a.Tq + t] : 0;
  *c0 = imin(imax(start, 0), n);
  *c1 = n;
}

// Launch 1: block `block` = ((bh * chunks) + chunk) * splits + split. part_ml (rows, splits, 2) gets (max, sum of
// weights), part_o (rows, splits, D) the unnormalised output; a split that sees nothing writes (-inf, 0, zeros).
// Phases per tile: scores by table lookups (thread = token), running maxima, weights, then the value pass: thread
// (subset, lane) adds, for the subset's tokens, weight x value centroid to VEC channels of every row. CW > 0: the
// codes are read as CW vectors of 16 bytes (plan.code_words), the next tile's during this one.
template <class C, int VEC, int CW, class Block>
SR_HD void coded_split(Block& blk, const CqAttentionArgs& a, const Plan& p, int64_t block, void* shared,
                       float* part_o, float* part_ml) {
  const int G = static_cast<int>(p.G), K = static_cast<int>(a.k), g = static_cast<int>(a.g);
  const int D = static_cast<int>(a.D), nt = p.threads, S = p.subsets, lanes = D / VEC;
  const int64_t split = block % p.splits, chunk = (block / p.splits) % p.chunks, bh = block / (p.splits * p.chunks);
  const int64_t b = bh / a.Hkv, h = bh % a.Hkv, r0 = chunk * p.rows_per_block;
  const int nr = static_cast<int>(imin(p.rows_per_block, p.R - r0));
  const int64_t p0 = split * p.split_len, p1 = imin(a.t_coded, p0 + p.split_len);
  const C* kc = static_cast<const C*>(a.k_codes) + b * a.stride_b + h * a.stride_h;
  const C* vc = static_cast<const C*>(a.v_codes) + b * a.stride_b + h * a.stride_h;
  const Layout L = layout_for(p.rows_per_block, G, K, D, nt, S, static_cast<int>(sizeof(C)));
  char* base = static_cast<char*>(shared);
  float* vbook = reinterpret_cast<float*>(base + L.vbook);
  float* lut = reinterpret_cast<float*>(base + L.lut);
  float* wts = reinterpret_cast<float*>(base + L.weights);
  C* vcodes = reinterpret_cast<C*>(base + L.codes);
  int64_t* c0 = reinterpret_cast<int64_t*>(base + L.rows);
  int64_t* c1 = c0 + p.rows_per_block;
  float* m_run = reinterpret_cast<float*>(c1 + p.rows_per_block);
  float* factor = m_run + p.rows_per_block;
  uint32_t* tile_max = reinterpret_cast<uint32_t*>(factor + p.rows_per_block);

  // The tokens any row sees: [lo, hi) (every thread works it out; the emulation once).
  int64_t lo = p1, hi = p0;
  for (int i = 0; i < nr; ++i) {
    int64_t from, to;
    coded_range(a, b, r0 + i, &from, &to);
    from = imax(from, p0);
    to = imin(to, p1);
    if (to > from) {
      lo = imin(lo, from);
      hi = imax(hi, to);
    }
  }
  auto fetch = [&](Regs& r, int64_t at) {  // a token's codes into registers (vector path)
    for (int x = 0; x < CW; ++x) {
      r.next_k[x] = load_words(kc + at * G + 16 * x);
      r.next_v[x] = load_words(vc + at * G + 16 * x);
    }
  };

  blk.each([&](int t) {  // set-up: the first tile's codes in flight while the tables fill
    Regs& r = blk.regs(t);
    if (CW > 0 && lo + t < hi) fetch(r, lo + t);
    for (int i = t; i < nr; i += nt) {
      int64_t from, to;
      coded_range(a, b, r0 + i, &from, &to);
      c0[i] = imax(from, p0);
      c1[i] = imin(to, p1);
      m_run[i] = -INFINITY;
      tile_max[i] = order_bits(-INFINITY);
    }
    // Four table entries (and below, eight value floats) per step: their global loads overlap.
    const float* q = a.q + (bh * p.R + r0) * D;
    const float* k_books = a.k_books + h * G * K * g;
    const int entries = G * K * nr;
    for (int first_idx = t; first_idx < entries; first_idx += 4 * nt) {
      float dot[4] = {0.f, 0.f, 0.f, 0.f};
      for (int u = 0; u < 4; ++u) {
        const int idx = first_idx + u * nt;
        if (idx >= entries) break;
        const int i = idx % nr, jc = idx / nr, j = jc / K;
        const float* qi = q + i * D + j * g;
        const float* centroid = k_books + static_cast<int64_t>(jc) * g;
        for (int e = 0; e < g; ++e) dot[u] += qi[e] * centroid[e];
      }
      for (int u = 0; u < 4; ++u) {
        const int idx = first_idx + u * nt;
        if (idx < entries) lut[idx] = dot[u] * a.scale;
      }
    }
    const float* v_books = a.v_books + h * G * K * g;
    for (int first_idx = t; first_idx < K * D; first_idx += 8 * nt) {
      float v[8];
      for (int u = 0; u < 8; ++u) {
        const int idx = first_idx + u * nt;
        v[u] = idx < K * D ? v_books[idx] : 0.f;
      }
      for (int u = 0; u < 8; ++u) {
        const int idx = first_idx + u * nt;
        if (idx < K * D) vbook[idx] = v[u];
      }
    }
    for (int i = 0; i < kMaxRows; ++i) {
      r.l[i] = 0.f;
      for (int v = 0; v < 4; ++v) r.o[i][v] = 0.f;
    }
  });
  for (int64_t first = lo; first < hi; first += nt) {
    const int count = static_cast<int>(imin(hi - first, nt));
    blk.each([&](int t) {  // scores by table lookups; every thread reaches the block maximum
      const int64_t pos = first + t;
      float sc[kMaxRows];
      for (int i = 0; i < kMaxRows; ++i) sc[i] = 0.f;
      auto add = [&](int j, int c) {
        const float* entry = lut + (j * K + c) * nr;
        if (nr == 4) {
          float e4[4];
          load<4>(entry, e4);
          for (int i = 0; i < 4; ++i) sc[i] += e4[i];
        } else {
          for (int i = 0; i < kMaxRows; ++i) {
            if (i < nr) sc[i] += entry[i];
          }
        }
      };
      if (t < count) {
        if constexpr (CW > 0) {
          Regs& r = blk.regs(t);
          Words kw[CW], vw[CW];
          for (int x = 0; x < CW; ++x) {
            kw[x] = r.next_k[x];
            vw[x] = r.next_v[x];
          }
          if (pos + nt < hi) fetch(r, pos + nt);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
          for (int j = 0; j < 16 * CW; ++j) add(j, byte_of(kw, j));
          for (int x = 0; x < CW; ++x) store_words(vcodes + t * G + 16 * x, vw[x]);
        } else {
          const C* code = kc + pos * G;
          for (int j = 0; j < G; ++j) add(j, static_cast<int>(code[j]));
          for (int j = 0; j < G; ++j) vcodes[t * G + j] = vc[pos * G + j];
        }
      }
      for (int i = 0; i < kMaxRows; ++i) {
        if (i >= nr) break;
        const float s = t < count && pos >= c0[i] && pos < c1[i] ? sc[i] : -INFINITY;
        blk.block_max(&tile_max[i], order_bits(s));
        wts[t * nr + i] = s;
      }
    });
    blk.each([&](int t) {  // running maxima, and the factor that rescales what was accumulated when one rose
      for (int i = t; i < nr; i += nt) {
        const float m = m_run[i], tm = from_order_bits(tile_max[i]);
        tile_max[i] = order_bits(-INFINITY);
        factor[i] = tm > m && m > -INFINITY ? exp_of(m - tm) : 1.f;
        m_run[i] = fmax_(m, tm);
      }
    });
    blk.each([&](int t) {  // weights
      if (t >= count) return;
      for (int i = 0; i < nr; ++i) {
        const float s = wts[t * nr + i];
        wts[t * nr + i] = s == -INFINITY ? 0.f : exp_of(s - m_run[i]);
      }
    });
    blk.each([&](int t) {  // value pass
      const int sub = t / lanes, e = (t % lanes) * VEC, j = e / g;
      if (sub >= S) return;
      Regs& r = blk.regs(t);
      for (int i = 0; i < kMaxRows; ++i) {
        if (i >= nr) break;
        r.l[i] *= factor[i];
        for (int v = 0; v < VEC; ++v) r.o[i][v] *= factor[i];
      }
      for (int tok = sub; tok < count; tok += S) {
        float value[VEC];
        load<VEC>(vbook + (j * K + static_cast<int>(vcodes[tok * G + j])) * g + e % g, value);
        float w[kMaxRows];
        if (nr == 4) {
          load<4>(wts + tok * 4, w);
        } else {
          for (int i = 0; i < kMaxRows; ++i) w[i] = i < nr ? wts[tok * nr + i] : 0.f;
        }
        for (int i = 0; i < kMaxRows; ++i) {
          if (i >= nr) break;
          r.l[i] += w[i];
          for (int v = 0; v < VEC; ++v) r.o[i][v] += w[i] * value[v];
        }
      }
    });
  }
  float* sums = lut;  // the tables are no longer read: the subsets' outputs (S, nr, D), then their sums (S, nr)
  float* sums_l = lut + S * nr * D;
  blk.each([&](int t) {
    const int sub = t / lanes, lane = t % lanes;
    if (sub >= S) return;
    const Regs& r = blk.regs(t);
    for (int i = 0; i < kMaxRows; ++i) {
      if (i >= nr) break;
      for (int v = 0; v < VEC; ++v) sums[(sub * nr + i) * D + lane * VEC + v] = r.o[i][v];
      if (lane == 0) sums_l[sub * nr + i] = r.l[i];
    }
  });
  blk.each([&](int t) {
    for (int idx = t; idx < nr * D; idx += nt) {
      const int i = idx / D, e = idx % D;
      float o = 0.f;
      for (int sub = 0; sub < S; ++sub) o += sums[(sub * nr + i) * D + e];
      const int64_t slot = (bh * p.R + r0 + i) * p.splits + split;
      part_o[slot * D + e] = o;
      if (e == 0) {
        float l = 0.f;
        for (int sub = 0; sub < S; ++sub) l += sums_l[sub * nr + i];
        part_ml[slot * 2] = m_run[i];
        part_ml[slot * 2 + 1] = l;
      }
    }
  });
}

// Launch 2: query row `row` (of B * Hkv * R), with 2 W + splits floats of shared `scratch`: the window's scores,
// then its weights and the splits' scale factors, then each thread's channels merged. A row that sees nothing gets
// zeros (as in the reference).
template <class Block>
SR_HD void merge_row(Block& blk, const CqAttentionArgs& a, const Plan& p, int64_t row, float* scratch,
                     const float* part_o, const float* part_ml) {
  const int64_t bh = row / p.R, r = row % p.R, b = bh / a.Hkv, t_q = r % a.Tq, T = a.t_coded, W = a.w, D = a.D;
  const int nt = p.threads;
  const int64_t start = a.starts != nullptr ? a.starts[b * a.Tq + t_q] : 0;
  const int64_t n_win = imin(imax(W - a.Tq + t_q + 1, 0), W);
  const int64_t w0 = imin(imax(start - T, 0), n_win);
  const float* q = a.q + row * D;
  const float* ml = part_ml + row * p.splits * 2;
  float* window = scratch;  // scores, read by every thread between the phases: weights go elsewhere
  float* window_w = scratch + W;
  float* split_scale = scratch + 2 * W;
  blk.each([&](int t) {
    for (int64_t w = w0 + t; w < n_win; w += nt) {
      const float* key = a.k_recent + (bh * W + w) * D;
      float dot = 0.f;
      for (int64_t e = 0; e < D; ++e) dot += q[e] * key[e];
      window[w] = dot * a.scale;
    }
  });
  float m = -INFINITY;
  for (int64_t sp = 0; sp < p.splits; ++sp) {
    if (ml[sp * 2 + 1] > 0.f) m = fmax_(m, ml[sp * 2]);
  }
  for (int64_t w = w0; w < n_win; ++w) m = fmax_(m, window[w]);
  blk.each([&](int t) {
    for (int64_t w = w0 + t; w < n_win; w += nt) window_w[w] = exp_of(window[w] - m);
    for (int64_t sp = t; sp < p.splits; sp += nt) split_scale[sp] = ml[sp * 2 + 1] > 0.f ? exp_of(ml[sp * 2] - m) : 0.f;
  });
  float l = 0.f;
  for (int64_t sp = 0; sp < p.splits; ++sp) l += ml[sp * 2 + 1] * split_scale[sp];
  for (int64_t w = w0; w < n_win; ++w) l += window_w[w];
  blk.each([&](int t) {
    for (int64_t e = t; e < D; e += nt) {
      float o = 0.f;
      for (int64_t sp = 0; sp < p.splits; ++sp) o += part_o[(row * p.splits + sp) * D + e] * split_scale[sp];
      for (int64_t w = w0; w < n_win; ++w) o += window_w[w] * a.v_recent[(bh * W + w) * D + e];
      a.out[row * D + e] = l > 0.f ? o / l : 0.f;
    }
  });
}

}  // namespace cqfused
}  // namespace sr::cuda
