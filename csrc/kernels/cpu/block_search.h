// Block-max pruned top-k search (torch-free), after BMP (Mallia, Suel, Tonellotto, SIGIR 2024) with superblocks
// (DSP, Carlson et al., SIGIR 2025): documents, stored in a clustered order, are cut into blocks of `block_size`,
// and runs of `superblock` blocks form superblocks. Each term keeps an 8-bit upper bound of its weight per
// superblock (term-major) and per block (superblock-major: the blocks of one superblock side by side). A query bounds
// every superblock, bounds the blocks of a superblock only when its bound is the largest left, scores blocks from a
// forward index in decreasing bound order, and stops when its k-th score beats alpha x the largest bound left
// (alpha = 1: exact). Bounding superblocks first is what keeps the fixed cost per query small: at 8.8M documents
// bounding all 1.1M blocks took 3.5 of 3.8 ms.
#pragma once

#include <cstdint>

#include "kernels/cpu/search.h"
#include "kernels/cpu/simd.h"
#include "kernels/cpu/sparse_dot.h"

namespace sr::cpu {

struct BlockMaxIndex {
  int64_t ndocs, dim, block_size, nblocks, superblock, nsuper;
  int64_t nnz;  // entries of fwd_terms
  // Forward index in stored order: document d's terms (ascending, uint16 when `terms16`, else int32) and weights
  // of `wtype` at [fwd_ptr[d], fwd_ptr[d + 1]); doc_ids[d] is its user-facing id.
  const int64_t* fwd_ptr;
  const void* fwd_terms;
  bool terms16;
  const void* fwd_weights;
  ValueType wtype;
  const int64_t* doc_ids;
  const float* scale;  // term t's 8-bit bounds q stand for weights <= q * scale[t]
  // Superblock maxima of term t: a dense row of nsuper bytes at sb_dense + nsuper * sb_dense_row[t] when
  // sb_dense_row[t] >= 0, else the sparse entries [sb_ptr[t], sb_ptr[t + 1]) of (superblock, bound).
  int64_t sb_dense_rows, sb_entries;
  const int64_t* sb_dense_row;
  const uint8_t* sb_dense;
  const int64_t* sb_ptr;
  const int32_t* sb_ids;
  const uint8_t* sb_values;
  // Block maxima, superblock-major: superblock s's terms, ascending (the type of fwd_terms), at [blk_ptr[s],
  // blk_ptr[s + 1]); entry e's `superblock` bounds (one per block of s, 0 past the last block) at blk_values +
  // superblock * e. Not read (and built empty) when superblock is 1.
  int64_t blk_entries;
  const int64_t* blk_ptr;
  const void* blk_terms;
  const uint8_t* blk_values;
};

// Per-thread scratch: slot holds max(dim + 1, 65536) zeroed bytes (left zeroed); qslot 256 floats; ub and order
// nsuper floats and int32s; blk_ub `superblock` floats; heap nblocks uint64s.
struct BlockScratch {
  uint8_t* slot;
  float* qslot;
  float* ub;
  int32_t* order;
  float* blk_ub;
  uint64_t* heap;
};

}  // namespace sr::cpu

// Top k of one query (terms ascending, unique) over the index, best first (score descending, ties to the lower
// user id), written to out_scores/out_ids (k slots; unfilled slots untouched). Returns true when the result is
// final: k documents found and the k-th score > 0. Otherwise (fewer matching documents, a non-finite query weight)
// the caller must search exhaustively, since exhaustive search also ranks documents that score 0. With
// `query_cut` > 0 the bounds use only the query's `query_cut` terms of largest weight x maximum (approximate; the
// scores still use every term). The blocks scored are a prefix of one order (bound descending) that alpha does
// not change, so recall grows with alpha. `blocks_visited` receives the number of
// blocks scored, or -1 when the index's offsets or ids turned out to be malformed (every read and write stays in
// bounds regardless; the result is then unusable). The maxima are trusted to bound the weights: maxima that do not
// give approximate results. With `allowed` (one byte per user id; null: every document) only documents whose byte
// is not 0 are ranked.
SR_SIMD_DECLARE(bool block_search_query(const BlockMaxIndex& ix, const SearchQuery& q, int64_t k, float alpha,
                                        int64_t query_cut, const uint8_t* allowed,
                                        const BlockScratch& scratch, float* out_scores, int64_t* out_ids,
                                        int64_t* blocks_visited))
// Top k of one query among the documents stored at `positions` (npos of them, each in [0, ndocs)) that `allowed`
// lets through (as in block_search_query), scored from the forward index exactly as block_search_query scores them
// (bit-identical to exhaustive search), documents scoring 0 included: a filter that allows few documents is
// answered by scoring those alone. Returns false, leaving the query to exhaustive search, for queries
// block_search_query also leaves to it (non-finite weights, unsorted or repeated terms, more than 255 terms). `scored` receives npos, or -1 when the index's offsets or ids turned out
// to be malformed (reads stay in bounds; the result is then unusable). Uses scratch.slot and scratch.qslot only.
SR_SIMD_DECLARE(bool scan_positions(const BlockMaxIndex& ix, const SearchQuery& q, int64_t k,
                                    const int64_t* positions, int64_t npos, const uint8_t* allowed,
                                    const BlockScratch& scratch, float* out_scores, int64_t* out_ids,
                                    int64_t* scored))
// Term-major maxima of a forward index (documents in stored order, terms ascending per document, weights >= 0) over
// groups of `group` documents, quantized to 8 bits per term: scale[t] (dim) gets max weight / 255 (slightly
// above, 1 for a term without weight), and bound q * scale[t] >= the group's largest weight of t (exactly, in
// float32). Terms in at least `min_dense` groups get a dense row (dense_row[t] = its row, else -1); the others
// sparse entries (group, q), groups ascending. Two calls: with `dense`, `ptr`, `groups` and `values` null it
// fills scale, dense_row and the number of dense rows (returned), and ptr's counts; then, with the arrays
// allocated (dense: rows x ngroups zeroed bytes; ptr: dim + 1 offsets), it fills them.
SR_SIMD_DECLARE(int64_t term_maxima(const int64_t* fwd_ptr, const void* fwd_terms, bool terms16,
                                    const void* fwd_weights, ValueType wtype, int64_t ndocs, int64_t dim,
                                    int64_t group, int64_t min_dense, float* scale, int64_t* dense_row,
                                    int64_t* ptr, uint8_t* dense, int32_t* groups, uint8_t* values))
// Superblock-major block maxima of superblocks [s_lo, s_hi) (blocks of `block_size` documents, `superblock` blocks
// each), quantized with `scale` as term_maxima does. With `terms` null it writes each superblock's number of
// distinct terms to counts[s - s_lo]; otherwise it writes superblock s's terms (ascending, the type of fwd_terms)
// from terms[ptr[s]] and their bounds, `superblock` bytes per term (0 for blocks without the term or past the last),
// from values[superblock * ptr[s]].
SR_SIMD_DECLARE(void superblock_maxima(const int64_t* fwd_ptr, const void* fwd_terms, bool terms16,
                                       const void* fwd_weights, ValueType wtype, int64_t ndocs, int64_t dim,
                                       int64_t block_size, int64_t superblock, const float* scale, int64_t s_lo,
                                       int64_t s_hi, int64_t* counts, const int64_t* ptr, void* terms,
                                       uint8_t* values))
