#include "kernels/cpu/list_search.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/cpu/block_score.h"

namespace sr::cpu::SR_SIMD_NS {
namespace {

// The heap keys (block_key) of a query's candidate groups, taken largest first. Most queries stop after a few dozen
// groups of thousands, and ordering all of them (a heap: 40% of a query's time at query_cut 16, 2M documents) is
// wasted: keys are bucketed by the top bits of their bound below the largest (16 buckets an octave, one histogram
// pass), and the next slice of buckets (64 keys or more, doubling) is moved to the front and sorted when reached.
// The order is that of the keys, as a heap's.
class BestFirst {
 public:
  BestFirst(uint64_t* keys, int64_t n) : keys_(keys), n_(n) {
    for (int64_t i = 0; i < n; ++i) top_ = std::max(top_, uint32_t(keys[i] >> 32));
    for (int64_t i = 0; i < n; ++i) ++hist_[bucket(keys[i])];
  }
  // Whether keys are left; then next() is the largest.
  bool more() {
    if (next_ == end_ && end_ < n_) refill();
    return next_ < n_;
  }
  uint64_t next() const { return keys_[next_]; }
  void pop() { ++next_; }
  // The key i places after next(), where already sorted, else 0 (no key is 0).
  uint64_t peek(int64_t i) const { return next_ + i < end_ ? keys_[next_ + i] : 0; }

 private:
  static constexpr int kBuckets = 256;
  int bucket(uint64_t key) const { return int(std::min<uint32_t>((top_ - uint32_t(key >> 32)) >> 19, kBuckets - 1)); }
  void refill() {
    int64_t count = 0;
    int hi = lo_;
    while (hi < kBuckets && count < want_) count += hist_[hi++];
    const auto* mid = std::partition(keys_ + end_, keys_ + n_, [&](uint64_t key) { return bucket(key) < hi; });
    end_ = mid - keys_;
    std::sort(keys_ + next_, keys_ + end_, std::greater<>());
    lo_ = hi;
    want_ *= 2;
  }
  uint64_t* keys_;
  int64_t n_, next_ = 0, end_ = 0, want_ = 64;
  uint32_t top_ = 0;
  int lo_ = 0;
  int64_t hist_[kBuckets] = {};
};

template <class W, class Term>
bool list_query(const BlockMaxIndex& ix, const TermLists& L, const SearchQuery& q, int64_t k, float alpha,
                int64_t query_cut, const uint8_t* allowed, const BlockScratch& s, const ListScratch& ls,
                float* out_scores, int64_t* out_ids, int64_t* groups_visited) {
  *groups_visited = 0;
  if (!scorable(q)) return false;
  int32_t cut[256];
  const int64_t ncut = select_bound_terms(ix, q, query_cut, cut);
  // Summary scores of the groups of each list: for each positive query term, its entries in the list's transposed
  // summaries (or its single entry) are added to the groups' sums (acc, one float per group of the list). A list's
  // offsets, each matched directory entry and each run of entries are misses of their own (~9 us a list when taken
  // one after the other at 2M documents): the work goes in stages over all lists, each prefetching what the next
  // one reads, so that the misses overlap.
  const auto* dterms = static_cast<const Term*>(L.dir_terms);
  const auto* oterms = static_cast<const Term*>(L.one_terms);
  for (int64_t i = 0; i < ncut; ++i) {
    const int64_t t = q.terms[cut[i]];
    __builtin_prefetch(L.list_ptr + t);
    __builtin_prefetch(L.dir_ptr + t);
    __builtin_prefetch(L.ent_ptr + t);
    __builtin_prefetch(L.one_ptr + t);
  }
  auto& spans = *ls.spans;
  spans.resize(ncut);
  int64_t total = 0;
  bool ok = true;
  for (int64_t i = 0; i < ncut && ok; ++i) {
    const int64_t t = q.terms[cut[i]];
    auto& sp = spans[i];
    sp = {L.list_ptr[t], L.list_ptr[t + 1] - L.list_ptr[t], L.dir_ptr[t], L.dir_ptr[t + 1], L.ent_ptr[t],
          L.ent_ptr[t + 1], L.one_ptr[t], L.one_ptr[t + 1]};
    ok = 0 <= sp.g0 && 0 <= sp.ng && sp.ng <= 65536 && sp.g0 + sp.ng <= L.ngroups && 0 <= sp.d0 && sp.d0 <= sp.d1 &&
         sp.d1 <= L.ndir && 0 <= sp.e0 && sp.e0 <= sp.e1 && sp.e1 <= L.nent && 0 <= sp.o0 && sp.o0 <= sp.o1 &&
         sp.o1 <= L.none;
    total += sp.ng;
    if (ok) {
      __builtin_prefetch(dterms + sp.d0);
      __builtin_prefetch(oterms + sp.o0);
    }
  }
  if (!ok) {
    *groups_visited = -1;
    return false;
  }
  // The query terms found in each list: a directory entry (at = j) or a single entry (at = o, single).
  auto& matches = *ls.matches;
  matches.clear();
  for (int64_t i = 0; i < ncut; ++i) {
    const auto& sp = spans[i];
    int64_t j = sp.d0, o = sp.o0;
    for (int64_t r = 0; r < q.nterms && (j < sp.d1 || o < sp.o1); ++r) {
      if (!(q.weights[r] > 0.0f)) continue;
      const int64_t u = q.terms[r];
      const float w = q.weights[r] * ix.scale[u];
      j = skip_below(dterms, j, sp.d1, Term(u));
      if (j < sp.d1 && int64_t(dterms[j]) == u) {
        __builtin_prefetch(L.dir_at + j);
        matches.push_back({i, w, j, false});
        continue;  // a term has a directory entry or a single entry, never both
      }
      o = skip_below(oterms, o, sp.o1, Term(u));
      if (o < sp.o1 && int64_t(oterms[o]) == u) {
        __builtin_prefetch(L.one_groups + o);
        __builtin_prefetch(L.one_values + o);
        matches.push_back({i, w, o, true});
      }
    }
  }
  // Directory entries to their runs of entries [at, end).
  for (auto& m : matches) {
    if (m.single) continue;
    const auto& sp = spans[m.list];
    const int64_t j = m.at;
    m.at = std::clamp<int64_t>(sp.e0 + int64_t(uint32_t(L.dir_at[j])), sp.e0, sp.e1);
    m.end = j + 1 < sp.d1 ? std::clamp<int64_t>(sp.e0 + int64_t(uint32_t(L.dir_at[j + 1])), m.at, sp.e1) : sp.e1;
    __builtin_prefetch(L.ent_steps + m.at);
    __builtin_prefetch(L.ent_values + m.at);
  }
  auto& cand = *ls.candidates;
  if (int64_t(cand.size()) < total) cand.resize(total);
  fill_slots(q, s);
  float* acc = ls.acc;
  int64_t n = 0;
  for (size_t m = 0, i = 0; i < size_t(ncut); ++i) {
    const auto& sp = spans[i];
    const uint32_t last = uint32_t(std::max<int64_t>(sp.ng, 1) - 1);
    for (; m < matches.size() && matches[m].list == int64_t(i); ++m) {
      const auto& mt = matches[m];
      const float w = mt.w;  // a local: stores to acc could alias mt
      if (mt.single) {
        acc[std::min(uint32_t(L.one_groups[mt.at]), last)] += w * float(L.one_values[mt.at]);
        continue;
      }
      uint32_t g = 0;
      for (int64_t e = mt.at; e < mt.end; ++e) {
        g += L.ent_steps[e];
        acc[std::min(g, last)] += w * float(L.ent_values[e]);
      }
    }
    for (int64_t g = 0; g < sp.ng; ++g) {
      if (acc[g] > 0.0f) cand[n++] = block_key(acc[g], sp.g0 + g);
      acc[g] = 0.0f;
    }
  }

  // Groups best summary first (BestFirst); a document listed in several groups is scored once.
  const float margin = 1.0f + float(q.nterms + 4) * 2.4e-7f;
  BestK best(out_scores, out_ids, k);
  BestFirst order(cand.data(), n);
  auto& scored = *ls.scored;
  scored.clear();
  // Groups are scored a batch at a time: up to kBatch of them that pass the stopping test against the k-th score
  // so far. A group's documents lie anywhere in the forward index; fetching the offsets, ids and `seen` bytes of a
  // whole batch, then their terms and weights, lets the misses overlap (one group at a time, a group of ten cost
  // ~1.4-4.5 us at 2M documents). The groups scored are still a prefix of one order, and a later test sees a k-th
  // score no higher than one group at a time would, so recall still only grows with alpha.
  constexpr int64_t kBatch = 8;
  int64_t batch[kBatch];
  // The forward offsets and `seen` bytes (and ids, where a filter reads them) of the documents of group entries
  // [a, e).
  const auto prefetch_documents = [&](int64_t a, int64_t e) {
    for (int64_t j = a; j < e; ++j) {
      const uint32_t d = std::min(uint32_t(L.group_docs[j]), uint32_t(ix.ndocs - 1));
      __builtin_prefetch(ix.fwd_ptr + d);
      __builtin_prefetch(ls.seen + d);
      if (allowed != nullptr) __builtin_prefetch(ix.doc_ids + d);
    }
  };
  int64_t visited = 0;
  bool more = true;
  while (ok && more) {
    int64_t nb = 0;
    while (nb < kBatch) {
      if (!order.more() || (best.full() && best.floor() > alpha * key_bound(order.next()) * margin)) {
        more = false;
        break;
      }
      const int64_t g = key_block(order.next());
      order.pop();
      batch[nb++] = g;
      __builtin_prefetch(L.group_ptr + g);
    }
    // The groups likely to come next (the following ones in order, where already sorted) are fetched ahead, one
    // step a batch: their offsets three batches early, their document lists two, their documents' offsets one; so a
    // batch mostly finds its data in cache (1.1 us a group of 8 at 2M documents, mostly misses, without this).
    for (int64_t i = 0; i < 3 * kBatch; ++i) {
      const uint64_t key = order.peek(i);
      if (key == 0) break;
      const int64_t g = key_block(key);
      if (i >= 2 * kBatch) {
        __builtin_prefetch(L.group_ptr + g);
        continue;
      }
      const int64_t a = L.group_ptr[g], e = L.group_ptr[g + 1];
      if (!(0 <= a && a < e && e <= L.group_entries)) continue;
      if (i >= kBatch) {
        __builtin_prefetch(L.group_docs + a);
        __builtin_prefetch(L.group_docs + e - 1);
        continue;
      }
      prefetch_documents(a, e);
    }
    for (int64_t i = 0; i < nb && ok; ++i) {
      const int64_t a = L.group_ptr[batch[i]], e = L.group_ptr[batch[i] + 1];
      ok = 0 <= a && a <= e && e <= L.group_entries;
      if (ok) prefetch_documents(a, e);
    }
    const int64_t first = int64_t(scored.size());
    for (int64_t i = 0; i < nb && ok; ++i) {
      for (int64_t j = L.group_ptr[batch[i]]; j < L.group_ptr[batch[i] + 1]; ++j) {
        const uint32_t d = uint32_t(L.group_docs[j]);
        ok = d < uint64_t(ix.ndocs);
        if (!ok) break;
        if (ls.seen[d]) continue;
        ls.seen[d] = 1;
        scored.push_back(d);
        const int64_t lo = std::clamp<int64_t>(ix.fwd_ptr[d], 0, ix.nnz);
        const int64_t hi = std::clamp<int64_t>(ix.fwd_ptr[d + 1], lo, ix.nnz);
        for (int64_t x = lo; x < hi; x += 32) {
          __builtin_prefetch(static_cast<const Term*>(ix.fwd_terms) + x);
          __builtin_prefetch(static_cast<const typename W::T*>(ix.fwd_weights) + x);
        }
      }
    }
    const auto listed = [&scored, first](int64_t i) { return scored[first + i]; };
    ok = ok && score_docs<W, Term>(ix, s.slot, s.qslot, int64_t(scored.size()) - first, listed, allowed, best);
    visited += nb;
  }
  for (const int64_t d : scored) ls.seen[d] = 0;
  clear_slots(q, s);
  if (!ok) {
    *groups_visited = -1;
    return false;
  }
  *groups_visited = visited;
  const bool complete = best.full() && best.floor() > 0.0f;
  best.finish();
  return complete;
}

template <class W, class Term>
void top_documents_impl(const int64_t* fwd_ptr, const Term* terms, const typename W::T* w, int64_t ndocs,
                        int64_t list_len, int64_t t_lo, int64_t t_hi, std::vector<int32_t>* docs) {
  // Per term a min-heap (std::greater) of the best list_len keys so far: weight above, position complemented
  // below (ties to the lower position).
  std::vector<std::vector<uint64_t>> heaps(t_hi - t_lo);
  for (int64_t d = 0; d < ndocs; ++d) {
    for (int64_t p = fwd_ptr[d]; p < fwd_ptr[d + 1]; ++p) {
      const int64_t t = int64_t(terms[p]) - t_lo;
      if (uint64_t(t) >= uint64_t(t_hi - t_lo)) continue;
      auto& h = heaps[t];
      const uint64_t key = block_key(W::load(w, p), d);
      if (int64_t(h.size()) < list_len) {
        h.push_back(key);
        std::push_heap(h.begin(), h.end(), std::greater<>());
      } else if (key > h.front()) {
        std::pop_heap(h.begin(), h.end(), std::greater<>());
        h.back() = key;
        std::push_heap(h.begin(), h.end(), std::greater<>());
      }
    }
  }
  for (int64_t t = 0; t < t_hi - t_lo; ++t) {
    auto& out = docs[t];
    out.resize(heaps[t].size());
    for (size_t j = 0; j < out.size(); ++j) out[j] = int32_t(key_block(heaps[t][j]));
    std::sort(out.begin(), out.end());
    std::vector<uint64_t>().swap(heaps[t]);
  }
}

// The `cut` largest weights of document d (ties to the lower term) as (weight, term).
template <class W, class Term>
inline void top_terms(const int64_t* fwd_ptr, const Term* terms, const typename W::T* w, int64_t d, int64_t cut,
                      std::vector<std::pair<float, int32_t>>& out) {
  out.clear();
  for (int64_t p = fwd_ptr[d]; p < fwd_ptr[d + 1]; ++p) out.emplace_back(W::load(w, p), int32_t(terms[p]));
  const auto larger = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  if (int64_t(out.size()) > cut) {
    std::nth_element(out.begin(), out.begin() + cut - 1, out.end(), larger);
    out.resize(cut);
  }
}

template <class W, class Term>
void cluster_impl(const int64_t* fwd_ptr, const Term* terms, const typename W::T* w, int32_t* docs, int64_t n,
                  int64_t group, int64_t doc_cut, std::vector<int32_t>& term_slot, std::vector<int64_t>& sizes) {
  const int64_t c = (n + group - 1) / group;
  if (c <= 1) {
    if (n > 0) sizes.push_back(n);
    return;
  }
  // The centroids' top terms, inverted: term_slot[u] indexes the sorted distinct terms, each with its (centroid,
  // weight) entries.
  std::vector<std::tuple<int32_t, int32_t, float>> inv;
  std::vector<std::pair<float, int32_t>> top;
  for (int64_t j = 0; j < c; ++j) {
    top_terms<W>(fwd_ptr, terms, w, docs[j * n / c], doc_cut, top);
    for (const auto& [wt, u] : top) inv.emplace_back(u, int32_t(j), wt);
  }
  std::sort(inv.begin(), inv.end());
  std::vector<int32_t> uniq, ptr;
  for (size_t e = 0; e < inv.size(); ++e) {
    if (e == 0 || std::get<0>(inv[e]) != std::get<0>(inv[e - 1])) {
      term_slot[std::get<0>(inv[e])] = int32_t(uniq.size());
      uniq.push_back(std::get<0>(inv[e]));
      ptr.push_back(int32_t(e));
    }
  }
  ptr.push_back(int32_t(inv.size()));
  std::vector<float> acc(c, 0.0f);
  std::vector<int32_t> touched, assign(n);
  for (int64_t i = 0; i < n; ++i) {
    top_terms<W>(fwd_ptr, terms, w, docs[i], doc_cut, top);
    for (const auto& [wt, u] : top) {
      const int32_t sl = term_slot[u];
      if (sl < 0) continue;
      for (int32_t e = ptr[sl]; e < ptr[sl + 1]; ++e) {
        const int32_t j = std::get<1>(inv[e]);
        if (acc[j] == 0.0f) touched.push_back(j);
        acc[j] += wt * std::get<2>(inv[e]);
      }
    }
    int32_t best = int32_t(i * c / n);  // no shared term: the centroid at or before it in stored order
    float best_dot = 0.0f;
    for (const int32_t j : touched) {
      if (acc[j] > best_dot || (acc[j] == best_dot && best_dot > 0.0f && j < best)) {
        best_dot = acc[j];
        best = j;
      }
      acc[j] = 0.0f;
    }
    touched.clear();
    assign[i] = best;
  }
  for (const int32_t u : uniq) term_slot[u] = -1;
  // Documents group by group (centroid order), positions ascending within each.
  std::vector<int64_t> start(c + 1, 0);
  for (int64_t i = 0; i < n; ++i) ++start[assign[i] + 1];
  for (int64_t j = 0; j < c; ++j) {
    // A cluster of more than `group` documents is cut into runs of at most `group`: its summary would be looser
    // and scoring it would cost more (clusters reached 50x `group` on real data).
    for (int64_t left = start[j + 1]; left > 0; left -= group) sizes.push_back(std::min(left, group));
    start[j + 1] += start[j];
  }
  std::vector<int32_t> sorted(n);
  for (int64_t i = 0; i < n; ++i) sorted[start[assign[i]]++] = docs[i];
  std::copy(sorted.begin(), sorted.end(), docs);
}

template <class W, class Term>
void summary_impl(const int64_t* fwd_ptr, const Term* terms, const typename W::T* w, const int32_t* docs, int64_t n,
                  const float* scale, double energy, std::vector<float>& gmax, std::vector<int32_t>& out_terms,
                  std::vector<uint8_t>& values) {
  std::vector<std::pair<float, int32_t>> maxima;
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t p = fwd_ptr[docs[i]]; p < fwd_ptr[docs[i] + 1]; ++p) {
      const int32_t t = int32_t(terms[p]);
      const float v = W::load(w, p);
      if (gmax[t] < 0.0f) maxima.emplace_back(0.0f, t);
      gmax[t] = std::max(gmax[t], v);
    }
  }
  for (auto& m : maxima) {
    m.first = gmax[m.second];
    gmax[m.second] = -1.0f;
    sum += m.first;
  }
  // The fewest largest maxima that reach `energy` of the sum (all of them at energy 1, zero maxima included).
  size_t keep = maxima.size();
  if (energy < 1.0) {
    std::sort(maxima.begin(), maxima.end(), [](const auto& a, const auto& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    });
    double acc = 0.0;
    for (size_t i = 0; i < maxima.size(); ++i) {
      acc += maxima[i].first;
      if (acc >= energy * sum) {
        keep = i + 1;
        break;
      }
    }
  }
  std::sort(maxima.begin(), maxima.begin() + keep, [](const auto& a, const auto& b) { return a.second < b.second; });
  for (size_t i = 0; i < keep; ++i) {
    out_terms.push_back(maxima[i].second);
    values.push_back(quantize_max(maxima[i].first, scale[maxima[i].second]));
  }
}

}  // namespace

bool list_search_query(const BlockMaxIndex& ix, const TermLists& lists, const SearchQuery& q, int64_t k, float alpha,
                       int64_t query_cut, const uint8_t* allowed, const BlockScratch& scratch,
                       const ListScratch& list_scratch, float* out_scores, int64_t* out_ids,
                       int64_t* blocks_visited) {
  return visit_value_type(ix.wtype, [&](auto v) {
    using W = decltype(v);
    return ix.terms16 ? list_query<W, uint16_t>(ix, lists, q, k, alpha, query_cut, allowed, scratch, list_scratch,
                                                out_scores, out_ids, blocks_visited)
                      : list_query<W, int32_t>(ix, lists, q, k, alpha, query_cut, allowed, scratch, list_scratch,
                                               out_scores, out_ids, blocks_visited);
  });
}

void term_top_documents(const int64_t* fwd_ptr, const void* fwd_terms, bool terms16, const void* fwd_weights,
                        ValueType wtype, int64_t ndocs, int64_t list_len, int64_t t_lo, int64_t t_hi,
                        std::vector<int32_t>* docs) {
  visit_value_type(wtype, [&](auto v) {
    using W = decltype(v);
    const auto* w = static_cast<const typename W::T*>(fwd_weights);
    if (terms16) {
      top_documents_impl<W>(fwd_ptr, static_cast<const uint16_t*>(fwd_terms), w, ndocs, list_len, t_lo, t_hi, docs);
    } else {
      top_documents_impl<W>(fwd_ptr, static_cast<const int32_t*>(fwd_terms), w, ndocs, list_len, t_lo, t_hi, docs);
    }
    return 0;
  });
}

void cluster_documents(const int64_t* fwd_ptr, const void* fwd_terms, bool terms16, const void* fwd_weights,
                       ValueType wtype, int32_t* docs, int64_t n, int64_t group, int64_t doc_cut,
                       std::vector<int32_t>& term_slot, std::vector<int64_t>& sizes) {
  visit_value_type(wtype, [&](auto v) {
    using W = decltype(v);
    const auto* w = static_cast<const typename W::T*>(fwd_weights);
    if (terms16) {
      cluster_impl<W>(fwd_ptr, static_cast<const uint16_t*>(fwd_terms), w, docs, n, group, doc_cut, term_slot, sizes);
    } else {
      cluster_impl<W>(fwd_ptr, static_cast<const int32_t*>(fwd_terms), w, docs, n, group, doc_cut, term_slot, sizes);
    }
    return 0;
  });
}

void group_summary(const int64_t* fwd_ptr, const void* fwd_terms, bool terms16, const void* fwd_weights,
                   ValueType wtype, const int32_t* docs, int64_t n, const float* scale, double energy,
                   std::vector<float>& gmax, std::vector<int32_t>& terms, std::vector<uint8_t>& values) {
  visit_value_type(wtype, [&](auto v) {
    using W = decltype(v);
    const auto* w = static_cast<const typename W::T*>(fwd_weights);
    if (terms16) {
      summary_impl<W>(fwd_ptr, static_cast<const uint16_t*>(fwd_terms), w, docs, n, scale, energy, gmax, terms,
                      values);
    } else {
      summary_impl<W>(fwd_ptr, static_cast<const int32_t*>(fwd_terms), w, docs, n, scale, energy, gmax, terms,
                      values);
    }
    return 0;
  });
}

}  // namespace sr::cpu::SR_SIMD_NS
