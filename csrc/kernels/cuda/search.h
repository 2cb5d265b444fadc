// CUDA exact top-k search (torch-free launcher). Each thread block accumulates one query's scores for a chunk of
// kSearchChunk documents in shared memory, term at a time, then sorts the chunk and keeps its best kk; the glue
// merges the chunks' candidates. Chunks never cross segments.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cpu/sparse_dot.h"

namespace sr::cuda {

constexpr int64_t kSearchChunk = 4096;

struct DevSegment {
  const int64_t* ptr;
  const int32_t* docs;
  const void* weights;
};

// chunks: nchunks rows of (segment, local lo, local hi, global id of lo). Queries: rows [0, nq) of qptr (absolute
// offsets into qterms / qweights). Writes, for query i and chunk c, kk (<= kSearchChunk) candidates best first at
// cand_scores / cand_ids[(i * nchunks + c) * kk ...], padded with (-inf, -1) past the chunk's size.
void search_chunks(const DevSegment* segs, const int64_t* chunks, int64_t nchunks, int64_t nq, const int64_t* qptr,
                   const int64_t* qterms, const float* qweights, int64_t kk, sr::cpu::ValueType wtype,
                   float* cand_scores, int64_t* cand_ids, cudaStream_t stream);

}  // namespace sr::cuda
