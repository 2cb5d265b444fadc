// The k best (score, id) pairs of a search, best first: score descending, ties to the lower id. Included by kernel
// files only (it lives in the per-level namespace, like value_load.h).
#pragma once

#include <cstdint>
#include <limits>

namespace sr::cpu::SR_SIMD_NS {

inline bool better(float s1, int64_t id1, float s2, int64_t id2) { return s1 > s2 || (s1 == s2 && id1 < id2); }

// The k best (score, id) pairs seen so far, kept as a binary heap whose root is the worst of them, in storage
// supplied by the caller. Once full, only a score above `floor()` can enter. With `allowed` (one byte per id), ids
// whose byte is 0 never enter: a search filter applied where candidates are chosen, so k allowed documents come
// back whenever k exist.
class BestK {
 public:
  BestK(float* s, int64_t* id, int64_t k, const uint8_t* allowed = nullptr) : s_(s), id_(id), k_(k), allowed_(allowed) {}

  bool full() const { return n_ == k_; }
  float floor() const { return full() ? s_[0] : -std::numeric_limits<float>::infinity(); }

  void offer(float s, int64_t id) {
    if (allowed_ != nullptr && allowed_[id] == 0) return;
    if (n_ < k_) {
      int64_t i = n_++;
      while (i > 0) {  // sift up past better parents
        const int64_t parent = (i - 1) / 2;
        if (!better(s_[parent], id_[parent], s, id)) break;
        s_[i] = s_[parent];
        id_[i] = id_[parent];
        i = parent;
      }
      s_[i] = s;
      id_[i] = id;
    } else if (k_ > 0 && better(s, id, s_[0], id_[0])) {
      sift_down(0, s, id, n_);
    }
  }

  // Sorts the kept pairs best first in place (heap sort: the worst goes to the back) and returns their count.
  int64_t finish() {
    const int64_t n = n_;
    for (int64_t end = n - 1; end > 0; --end) {
      const float s = s_[end];
      const int64_t id = id_[end];
      s_[end] = s_[0];
      id_[end] = id_[0];
      sift_down(0, s, id, end);
    }
    return n;
  }

 private:
  // Places (s, id) at hole i of the heap of size n, moving worse children up.
  void sift_down(int64_t i, float s, int64_t id, int64_t n) {
    for (;;) {
      int64_t c = 2 * i + 1;
      if (c >= n) break;
      if (c + 1 < n && better(s_[c], id_[c], s_[c + 1], id_[c + 1])) ++c;  // the worse child
      if (!better(s, id, s_[c], id_[c])) break;
      s_[i] = s_[c];
      id_[i] = id_[c];
      i = c;
    }
    s_[i] = s;
    id_[i] = id;
  }

  float* s_;
  int64_t* id_;
  int64_t k_;
  const uint8_t* allowed_;
  int64_t n_ = 0;
};

}  // namespace sr::cpu::SR_SIMD_NS
