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

template <class W, class Term>
bool list_query(const BlockMaxIndex& ix, const TermLists& L, const SearchQuery& q, int64_t k, float alpha,
                int64_t query_cut, const uint8_t* allowed, const BlockScratch& s, const ListScratch& ls,
                float* out_scores, int64_t* out_ids, int64_t* groups_visited) {
  *groups_visited = 0;
  if (!scorable(q)) return false;
  int32_t cut[256];
  const int64_t ncut = select_bound_terms(ix, q, query_cut, cut);
  int64_t total = 0;
  for (int64_t i = 0; i < ncut; ++i) {
    const int64_t t = q.terms[cut[i]];
    const int64_t a = L.list_ptr[t], e = L.list_ptr[t + 1];
    if (!(0 <= a && a <= e && e <= L.ngroups)) {
      *groups_visited = -1;
      return false;
    }
    total += e - a;
  }
  auto& cand = *ls.candidates;
  if (int64_t(cand.size()) < total) cand.resize(total);
  fill_slots(q, s);
  // Summary scores of the groups of each list: for each positive query term (ascending), its entries in the list's
  // transposed summaries (or its single entry) are added to the groups' sums (acc, one float per group of the list).
  const auto* dterms = static_cast<const Term*>(L.dir_terms);
  const auto* oterms = static_cast<const Term*>(L.one_terms);
  float* acc = ls.acc;
  bool ok = true;
  int64_t n = 0;
  for (int64_t i = 0; i < ncut && ok; ++i) {
    const int64_t t = q.terms[cut[i]];
    const int64_t g0 = L.list_ptr[t], ng = L.list_ptr[t + 1] - g0;
    const int64_t d0 = L.dir_ptr[t], d1 = L.dir_ptr[t + 1], e0 = L.ent_ptr[t], e1 = L.ent_ptr[t + 1];
    const int64_t o0 = L.one_ptr[t], o1 = L.one_ptr[t + 1];
    ok = 0 <= g0 && 0 <= ng && ng <= 65536 && g0 + ng <= L.ngroups && 0 <= d0 && d0 <= d1 && d1 <= L.ndir &&
         0 <= e0 && e0 <= e1 && e1 <= L.nent && 0 <= o0 && o0 <= o1 && o1 <= L.none;
    if (!ok) break;
    const uint32_t last = uint32_t(std::max<int64_t>(ng, 1) - 1);
    int64_t j = d0, o = o0;
    for (int64_t r = 0; r < q.nterms && (j < d1 || o < o1); ++r) {
      if (!(q.weights[r] > 0.0f)) continue;
      const int64_t u = q.terms[r];
      const float w = q.weights[r] * ix.scale[u];
      j = skip_below(dterms, j, d1, Term(u));
      if (j < d1 && int64_t(dterms[j]) == u) {
        const int64_t a = std::clamp<int64_t>(e0 + int64_t(uint32_t(L.dir_at[j])), e0, e1);
        const int64_t b = j + 1 < d1 ? std::clamp<int64_t>(e0 + int64_t(uint32_t(L.dir_at[j + 1])), a, e1) : e1;
        for (int64_t e = a; e < b; ++e) acc[std::min(uint32_t(L.ent_groups[e]), last)] += w * float(L.ent_values[e]);
        continue;  // a term has a directory entry or a single entry, never both
      }
      o = skip_below(oterms, o, o1, Term(u));
      if (o < o1 && int64_t(oterms[o]) == u) {
        acc[std::min(uint32_t(L.one_groups[o]), last)] += w * float(L.one_values[o]);
      }
    }
    for (int64_t g = 0; g < ng; ++g) {
      if (acc[g] > 0.0f) cand[n++] = block_key(acc[g], g0 + g);
      acc[g] = 0.0f;
    }
  }

  // Groups best summary first (a heap: most queries stop long before the last); a document listed in several
  // groups is scored once.
  const float margin = 1.0f + float(q.nterms + 4) * 2.4e-7f;
  BestK best(out_scores, out_ids, k);
  std::make_heap(cand.data(), cand.data() + n);
  auto& scored = *ls.scored;
  scored.clear();
  // Groups are scored a batch at a time: up to kBatch of them that pass the stopping test against the k-th score
  // so far. A group's documents lie anywhere in the forward index; fetching the offsets, ids and `seen` bytes of a
  // whole batch, then their terms and weights, lets the misses overlap (one group at a time, a group of ten cost
  // ~1.4-4.5 us at 2M documents). The groups scored are still a prefix of one order, and a later test sees a k-th
  // score no higher than one group at a time would, so recall still only grows with alpha.
  constexpr int64_t kBatch = 8;
  int64_t batch[kBatch];
  int64_t visited = 0;
  bool more = true;
  while (ok && more) {
    int64_t nb = 0;
    while (nb < kBatch) {
      if (n == 0 || (best.full() && best.floor() > alpha * key_bound(cand[0]) * margin)) {
        more = false;
        break;
      }
      std::pop_heap(cand.data(), cand.data() + n--);
      const int64_t g = key_block(cand[n]);
      batch[nb++] = g;
      __builtin_prefetch(L.group_ptr + g);
    }
    for (int64_t i = 0; i < nb && ok; ++i) {
      const int64_t a = L.group_ptr[batch[i]], e = L.group_ptr[batch[i] + 1];
      ok = 0 <= a && a <= e && e <= L.group_entries;
      for (int64_t j = a; j < e && ok; ++j) {
        const uint32_t d = std::min(uint32_t(L.group_docs[j]), uint32_t(ix.ndocs - 1));
        __builtin_prefetch(ix.fwd_ptr + d);
        __builtin_prefetch(ix.doc_ids + d);
        __builtin_prefetch(ls.seen + d);
      }
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
