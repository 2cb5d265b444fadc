// Candidate-list search (torch-free), approximate, after Seismic (Bruch, Nardini, Rulli, Venturini, SIGIR 2024),
// on the forward index of a block-max structure: each term keeps its `list_len` documents of largest weight,
// clustered into groups of about `group` similar documents; each group keeps a summary (the largest weight of each
// term over its documents, cut to the terms that carry `summary_energy` of their sum, 8-bit), stored transposed per
// list so that a query reads only its own terms' entries. A query takes the groups listed under its `query_cut`
// terms of largest weight x maximum, ranks them by the dot product of the query with their summaries, scores their
// documents from the forward index best group first, and stops once its k-th score beats alpha x the best summary
// score left. Where block-max search bounds every block (a cost that grows with the collection), this reads a few
// short lists.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/cpu/block_search.h"

namespace sr::cpu {

// The term lists of a BlockMaxIndex. Term t's groups: [list_ptr[t], list_ptr[t + 1]) (at most 65536); group g's
// documents (stored positions, ascending): group_docs[group_ptr[g], group_ptr[g + 1]). The summaries of a list are
// kept transposed, so that a query reads only the entries of its own terms: list t's distinct summary terms
// (ascending, the type of fwd_terms) are dir_terms[dir_ptr[t], dir_ptr[t + 1]); directory entry j's entries are
// [ent_ptr[t] + dir_at[j], ent_ptr[t] + dir_at[j + 1]) (the list's last up to ent_ptr[t + 1]), each a group of the list
// and that term's 8-bit maximum over the group (ent_values, dequantized with the index's scale, rounded up as its
// bounds are). The groups ascend and are stored as steps (ent_steps: the group is the sum of the steps of the run
// so far, from 0): a step of more than 255 is split by filler entries of step 255 and value 0, which add nothing.
// Two bytes an entry, where a 16-bit group number took three: the entries are most of the lists' memory. A term in
// the summary of a single group of the list (most terms: 70% of the directory on real data) is kept apart, without
// a directory entry: list t's such terms (ascending) are one_terms[one_ptr[t], one_ptr[t + 1]), each with its group
// (one_groups) and maximum (one_values), 5 bytes where the directory and an entry took 8.
struct TermLists {
  int64_t ngroups;
  const int64_t* list_ptr;
  const int64_t* group_ptr;
  const int32_t* group_docs;
  int64_t group_entries;
  const int64_t* dir_ptr;
  const void* dir_terms;
  const int32_t* dir_at;
  int64_t ndir;
  const int64_t* ent_ptr;
  const uint8_t* ent_steps;
  const uint8_t* ent_values;
  int64_t nent;
  const int64_t* one_ptr;
  const void* one_terms;
  const uint16_t* one_groups;
  const uint8_t* one_values;
  int64_t none;
};

// A query's view of one list (groups from g0, directory [d0, d1), entries [e0, e1), singles [o0, o1)), and a query
// term found in it: a directory entry's run of entries [at, end) or a single entry at `at`, with the term's weight.
struct ListSpan {
  int64_t g0, ng, d0, d1, e0, e1, o0, o1;
};
struct ListMatch {
  int64_t list;
  float w;
  int64_t at;
  bool single;
  int64_t end = 0;
};

// Per-thread scratch of list_search_query beside a BlockScratch (whose slot and qslot it uses): `seen`, ndocs
// zeroed bytes, and `acc`, 65536 zeroed floats (both left zeroed); the vectors are grown as needed.
struct ListScratch {
  uint8_t* seen;
  float* acc;
  std::vector<uint64_t>* candidates;
  std::vector<int64_t>* scored;
  std::vector<ListSpan>* spans;
  std::vector<ListMatch>* matches;
};

}  // namespace sr::cpu

// Top k of one query (as block_search_query: terms ascending and unique; same return value, outputs, tie rule and
// `allowed`) from the groups listed under the query's `query_cut` (0: all) positive terms of largest weight x
// maximum, best summary first, until the k-th score beats alpha x the best summary score left (alpha > 0); each
// document is scored once. Recall grows with alpha (the groups scored are a prefix of one order). With every
// posting listed, summaries of every term (summary_energy 1), every query term and alpha = 1 the results are
// exact: a summary then bounds its documents' scores. `blocks_visited` receives the groups scored, or -1 when
// offsets or ids turned out to be malformed (reads and writes stay in bounds regardless).
SR_SIMD_DECLARE(bool list_search_query(const BlockMaxIndex& ix, const TermLists& lists, const SearchQuery& q,
                                       int64_t k, float alpha, int64_t query_cut, const uint8_t* allowed,
                                       const BlockScratch& scratch, const ListScratch& list_scratch,
                                       float* out_scores, int64_t* out_ids, int64_t* blocks_visited))
// For each term of [t_lo, t_hi) (ids below dim): the stored positions of its (at most) `list_len` documents of
// largest weight (ties to the lower position), ascending, into docs[t - t_lo]. Reads every posting once per call.
SR_SIMD_DECLARE(void term_top_documents(const int64_t* fwd_ptr, const void* fwd_terms, bool terms16,
                                        const void* fwd_weights, ValueType wtype, int64_t ndocs, int64_t list_len,
                                        int64_t t_lo, int64_t t_hi, std::vector<int32_t>* docs))
// Splits the n documents docs[0, n) (stored positions, ascending) into groups of similar ones, Seismic's way: about
// n / group centroids evenly spaced among them, each document joining the centroid with which it has the largest
// dot product over the `doc_cut` largest weights of each (a document sharing none of those terms with any centroid
// joins the centroid at or before it). Reorders docs group by group (centroid order; positions ascending within a
// group) and appends the sizes of the non-empty groups to `sizes`, cutting larger ones into runs of `group`. `term_slot` holds dim int32s of -1 (left so).
SR_SIMD_DECLARE(void cluster_documents(const int64_t* fwd_ptr, const void* fwd_terms, bool terms16,
                                       const void* fwd_weights, ValueType wtype, int32_t* docs, int64_t n,
                                       int64_t group, int64_t doc_cut, std::vector<int32_t>& term_slot,
                                       std::vector<int64_t>& sizes))
// Summary of the documents at stored positions docs[0, n): each term's largest weight over them, cut to the fewest
// terms (largest maxima first, ties to the lower term) whose maxima sum to at least `energy` (in (0, 1]) of all,
// quantized with `scale` as term_maxima does; appended to terms (ascending) and values (TermLists keeps them
// transposed). `gmax` holds dim floats
// of -1 (left so).
SR_SIMD_DECLARE(void group_summary(const int64_t* fwd_ptr, const void* fwd_terms, bool terms16,
                                   const void* fwd_weights, ValueType wtype, const int32_t* docs, int64_t n,
                                   const float* scale, double energy, std::vector<float>& gmax,
                                   std::vector<int32_t>& terms, std::vector<uint8_t>& values))
