// Exact top-k search on the GPU (search.cu), one block per (chunk of kChunk documents, query): the block scores the
// query against its chunk in shared memory, term at a time from the postings, sorts the chunk and writes its kk
// best as candidates. With a merge (the one-launch search), the query's last block to finish then merges all of
// the query's candidates into its top k, so a search is one kernel launch. Written once for the GPU and for a host
// emulation (tests/search_emulation.cpp), like topk_select.h. Compiles without CUDA.
#pragma once

#include <climits>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/cuda/host_device.h"

namespace sr::cuda::searchchunk {

constexpr int kThreads = 512;
constexpr int64_t kChunk = 4096;
// Segments of one launch, passed by value (nothing to copy to the device first).
constexpr int kMaxSegments = 32;
// Largest k the merge takes: the best k so far and at least as many new candidates share the chunk's buffer.
constexpr int64_t kMaxMergeK = kChunk / 2;

// A segment's postings (term t: docs / weights [ptr[t], ptr[t + 1]), local ids sorted), its documents and the
// global id of its first one, and its first chunk in the launch.
struct Segment {
  const int64_t* ptr;
  const int32_t* docs;
  const void* weights;
  int64_t size, base, first_chunk;
};

// Chunks [0, chunks) of a launch, and where its candidates go: chunk c's kk slots of query q start at
// (q * stride + offset + c) * kk (a search cut into launches of kMaxSegments segments shares one buffer).
struct Segments {
  Segment seg[kMaxSegments];
  int n;
  int64_t chunks, offset, stride;
};

// A segment of the index: its postings and its number of documents.
struct SegmentData {
  const int64_t* ptr;
  const int32_t* docs;
  const void* weights;
  int64_t size;
};

// The launches of a search over `segs` in id order: the non-empty ones, at most kMaxSegments a launch, all writing
// one candidate buffer of `stride` (every launch's chunks) chunks per query.
inline std::vector<Segments> plan_launches(const std::vector<SegmentData>& segs) {
  std::vector<Segments> launches;
  int64_t base = 0, chunks = 0;
  for (const SegmentData& d : segs) {
    if (d.size > 0) {
      if (launches.empty() || launches.back().n == kMaxSegments) {
        launches.push_back(Segments{});
        launches.back().offset = chunks;
      }
      Segments& l = launches.back();
      const int64_t c = (d.size + kChunk - 1) / kChunk;
      l.seg[l.n++] = Segment{d.ptr, d.docs, d.weights, d.size, base, l.chunks};
      l.chunks += c;
      chunks += c;
    }
    base += d.size;
  }
  for (Segments& l : launches) l.stride = chunks;
  return launches;
}

struct Shared {
  float score[kChunk];
  int pos[kChunk];
  int64_t range_lo[kThreads], range_hi[kThreads];
  unsigned int last, fill;
};

SR_HD float neg_inf() {
#if defined(__CUDA_ARCH__)
  return __int_as_float(0xff800000);
#else
  const uint32_t bits = 0xff800000u;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

// a ranks before b: higher score, then lower position (document order).
SR_HD bool before(float sa, int ia, float sb, int ib) { return sa > sb || (sa == sb && ia < ib); }

SR_HD int64_t lower_bound(const int32_t* docs, int64_t lo, int64_t hi, int64_t value) {
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (docs[mid] < value) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Sorts (score, pos)[0, P) best first (bitonic; P a power of two <= kChunk).
template <class Block>
SR_HD void sort_best_first(Block& blk, Shared& sh, int P) {
  for (int size = 2; size <= P; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      blk.each([&](int t) {
        for (int i = t; i < P; i += kThreads) {
          const int j = i ^ stride;
          if (j > i && ((i & size) == 0) == before(sh.score[j], sh.pos[j], sh.score[i], sh.pos[i])) {
            const float s = sh.score[i];
            sh.score[i] = sh.score[j];
            sh.score[j] = s;
            const int p = sh.pos[i];
            sh.pos[i] = sh.pos[j];
            sh.pos[j] = p;
          }
        }
      });
    }
  }
}

// The query's terms and weights: [ptr[q], ptr[q + 1]) of terms / weights.
struct Queries {
  const int64_t* ptr;
  const int64_t* terms;
  const float* weights;
};

// Where the candidates go, and (merge) the query's results and its count of finished blocks.
struct Output {
  float* cand_scores;
  int64_t* cand_ids;
  int64_t kk;
  unsigned int* done;  // null: no merge in this launch
  float* scores;
  int64_t* ids;
  int64_t k;
};

// The query's last block: its top k of all its candidates (m of them, in chunk order, each chunk's best first),
// merged window by window into the best k so far: once k are held, only candidates above the k-th enter (an equal
// score comes later in document order, so it loses the tie), and a window with none costs no sort. Ties keep
// document order. (-inf, -1) past the candidates.
template <class Block>
SR_HD void merge(Block& blk, Shared& sh, const float* cand_s, const int64_t* cand_i, int64_t m, const Output& o,
                 float* out_s, int64_t* out_i) {
  const int64_t keep = o.k < m ? o.k : m;
  int64_t have = 0;
  blk.each([&](int t) {
    if (t == 0) sh.fill = 0;
  });
  for (int64_t next = 0; next < m;) {
    const int64_t take = kChunk - have < m - next ? kChunk - have : m - next;
    blk.each([&](int t) {
      const float kth = have == keep ? sh.score[keep - 1] : neg_inf();
      for (int64_t i = t; i < take; i += kThreads) {
        const float s = blk.load(&cand_s[next + i]);
        if (have < keep || s > kth) {
          const int64_t slot = have + blk.atomic_add(&sh.fill, 1u);
          sh.score[slot] = s;
          sh.pos[slot] = static_cast<int>(next + i);
        }
      }
    });
    next += take;
    int64_t fresh = 0;
    blk.each([&](int) { fresh = sh.fill; });  // a barrier before thread 0 resets it
    if (fresh == 0) continue;
    int P = 1;
    while (P < have + fresh) P *= 2;
    blk.each([&](int t) {
      for (int64_t i = have + fresh + t; i < P; i += kThreads) {
        sh.score[i] = neg_inf();
        sh.pos[i] = INT_MAX;
      }
      if (t == 0) sh.fill = 0;
    });
    sort_best_first(blk, sh, P);
    have = keep < have + fresh ? keep : have + fresh;
  }
  blk.each([&](int t) {
    for (int64_t j = t; j < o.k; j += kThreads) {
      const bool real = j < have;
      out_s[j] = real ? sh.score[j] : neg_inf();
      out_i[j] = real ? blk.load(&cand_i[sh.pos[j]]) : -1;
    }
  });
}

// Block (chunk c, query q) of a launch.
template <class W, class Block>
SR_HD void search_block(Block& blk, Shared& sh, const Segments& segs, int64_t c, int64_t q, const Queries& qs,
                        const Output& o) {
  int s = 0;
  while (s + 1 < segs.n && segs.seg[s + 1].first_chunk <= c) ++s;
  const Segment& seg = segs.seg[s];
  const int64_t lo = (c - seg.first_chunk) * kChunk, hi = lo + kChunk < seg.size ? lo + kChunk : seg.size;
  const int n = static_cast<int>(hi - lo);
  const W* w = static_cast<const W*>(seg.weights);
  blk.each([&](int t) {
    for (int i = t; i < kChunk; i += kThreads) {
      sh.score[i] = i < n ? 0.0f : neg_inf();
      sh.pos[i] = i;
    }
  });
  // Terms in tiles of kThreads: each thread finds one term's postings inside [lo, hi), then all scatter them.
  const int64_t q_end = qs.ptr[q + 1];
  for (int64_t tile = qs.ptr[q]; tile < q_end; tile += kThreads) {
    const int64_t m = q_end - tile < kThreads ? q_end - tile : kThreads;
    blk.each([&](int t) {
      if (t < m) {
        const int64_t term = qs.terms[tile + t];
        const int64_t a = lower_bound(seg.docs, seg.ptr[term], seg.ptr[term + 1], lo);
        sh.range_lo[t] = a;
        sh.range_hi[t] = lower_bound(seg.docs, a, seg.ptr[term + 1], hi);
      }
    });
    blk.each([&](int t) {
      for (int64_t j = 0; j < m; ++j) {
        const float qw = qs.weights[tile + j];
        for (int64_t p = sh.range_lo[j] + t; p < sh.range_hi[j]; p += kThreads) {
          blk.atomic_add(&sh.score[seg.docs[p] - lo], qw * to_float(w[p]));
        }
      }
    });
  }
  sort_best_first(blk, sh, static_cast<int>(kChunk));
  const int64_t at = (q * segs.stride + segs.offset + c) * o.kk;
  blk.each([&](int t) {
    for (int64_t i = t; i < o.kk; i += kThreads) {
      const bool real = i < n;
      o.cand_scores[at + i] = real ? sh.score[i] : neg_inf();
      o.cand_ids[at + i] = real ? seg.base + lo + sh.pos[i] : -1;
    }
  });
  if (o.done == nullptr) return;
  blk.each([&](int t) {
    if (t == 0) sh.last = blk.arrive(&o.done[q]) + 1 == static_cast<unsigned int>(segs.chunks);
  });
  if (!sh.last) return;
  const int64_t first = q * segs.stride * o.kk;
  merge(blk, sh, o.cand_scores + first, o.cand_ids + first, segs.chunks * o.kk, o, o.scores + q * o.k,
        o.ids + q * o.k);
}

}  // namespace sr::cuda::searchchunk
