// CUDA exact top-k search (torch-free launcher): one block per (chunk of searchchunk::kChunk documents, query)
// scores its chunk and keeps its best kk as candidates (search_chunk.h).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cpu/sparse_dot.h"
#include "kernels/cuda/search_chunk.h"

namespace sr::cuda {

// Queries [0, nq) of qs (qs.ptr offset to the first). Without out.done, writes the candidates of every chunk of
// `segs` (see Segments for where); with out.done (nq counters, zeroed), the query's last block also merges them
// into out.scores / out.ids (nq x k, k <= kMaxMergeK, best first, (-inf, -1) past the documents): one launch.
cudaError_t search_chunks(const searchchunk::Segments& segs, int64_t nq, const searchchunk::Queries& qs,
                          sr::cpu::ValueType wtype, const searchchunk::Output& out, cudaStream_t stream);

}  // namespace sr::cuda
