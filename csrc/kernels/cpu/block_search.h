// Block-max pruned top-k search (torch-free), after BMP (Mallia, Suel, Tonellotto, SIGIR 2024): documents, stored in
// a clustered order, are cut into blocks of `block_size`; each term keeps an 8-bit upper bound of its weight per
// block. A query bounds every block's score, visits blocks in decreasing bound order, scores their documents from
// a forward index and stops when its k-th score beats alpha x the largest bound left (alpha = 1: exact).
#pragma once

#include <cstdint>

#include "kernels/cpu/search.h"
#include "kernels/cpu/simd.h"
#include "kernels/cpu/sparse_dot.h"

namespace sr::cpu {

struct BlockMaxIndex {
  int64_t ndocs, dim, block_size, nblocks;
  int64_t nnz, dense_rows, entries;  // sizes of fwd_terms, of bm_dense in rows of nblocks, of bm_blocks
  // Forward index in stored order: document d's terms (ascending, uint16 when `terms16`, else int32) and weights
  // of `wtype` at [fwd_ptr[d], fwd_ptr[d + 1]); doc_ids[d] is its user-facing id.
  const int64_t* fwd_ptr;
  const void* fwd_terms;
  bool terms16;
  const void* fwd_weights;
  ValueType wtype;
  const int64_t* doc_ids;
  // Block maxima of term t, weight <= bm * scale[t]: a dense row of nblocks bytes at bm_dense + nblocks *
  // dense_row[t] when dense_row[t] >= 0, else the sparse entries [bm_ptr[t], bm_ptr[t + 1]) of (block, bm).
  const float* scale;
  const int64_t* dense_row;
  const uint8_t* bm_dense;
  const int64_t* bm_ptr;
  const int32_t* bm_blocks;
  const uint8_t* bm_values;
};

// Per-thread scratch: slot holds max(dim + 1, 65536) zeroed bytes (left zeroed); qslot 256 floats; ub nblocks floats; order nblocks
// int32s.
struct BlockScratch {
  uint8_t* slot;
  float* qslot;
  float* ub;
  int32_t* order;
};

}  // namespace sr::cpu

// Top k of one query (terms ascending, unique) over the index, best first (score descending, ties to the lower
// user id), written to out_scores/out_ids (k slots; unfilled slots untouched). Returns true when the result is
// final: k documents found and the k-th score > 0. Otherwise (fewer matching documents, a non-finite query weight)
// the caller must search exhaustively, since exhaustive search also ranks documents that score 0. With
// `query_cut` > 0 the bounds use only the query's `query_cut` terms of largest weight x maximum (approximate; the
// scores still use every term). `blocks_visited` receives the number of blocks scored, or -1 when the index's
// offsets or ids turned out to be malformed (every read and write stays in bounds regardless; the result is then
// unusable). The block maxima are trusted to bound the weights: maxima that do not give approximate results.
// With `allowed` (one byte per user id; null: every document) only documents whose byte is not 0 are ranked.
SR_SIMD_DECLARE(bool block_search_query(const BlockMaxIndex& ix, const SearchQuery& q, int64_t k, float alpha,
                                        int64_t query_cut, const uint8_t* allowed,
                                        const BlockScratch& scratch, float* out_scores, int64_t* out_ids,
                                        int64_t* blocks_visited))
// Block maxima of a forward index (documents in stored order, terms ascending per document, weights >= 0) over
// blocks of `block_size` documents, quantized to 8 bits per term: scale[t] (dim) gets max weight / 255 (slightly
// above, 1 for a term without weight), and bound q * scale[t] >= the block's largest weight of t (exactly, in
// float32). Terms with at least `min_dense` blocks get a dense row (dense_row[t] = its row, else -1); the others
// sparse entries (block, q), blocks ascending. Two calls: with `dense`, `ptr`, `blocks` and `values` null it
// fills scale, dense_row and the number of dense rows (returned), and ptr's counts; then, with the arrays
// allocated (dense: rows x nblocks zeroed bytes; ptr: dim + 1 offsets), it fills them.
SR_SIMD_DECLARE(int64_t block_maxima(const int64_t* fwd_ptr, const void* fwd_terms, bool terms16,
                                     const void* fwd_weights, ValueType wtype, int64_t ndocs, int64_t dim,
                                     int64_t block_size, int64_t min_dense, float* scale, int64_t* dense_row,
                                     int64_t* ptr, uint8_t* dense, int32_t* blocks, uint8_t* values))
