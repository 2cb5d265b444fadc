// Top-k CUDA kernels (torch-free: raw device pointers, a workspace and a stream). Same result as the CPU kernels
// in kernels/cpu/topk.h and sparse_retrieval.reference.topk, and the same 64-bit keys: (order code of the value
// << 32) | (0xFFFFFFFF - index), so the k largest keys are the top-k with ties to the lower index.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/cpu/topk.h"  // TopkDtype
#include "kernels/cuda/topk_select.h"

namespace sr::cuda {

using sr::cpu::TopkDtype;

// With SPARSE_RETRIEVAL_TOPK_RESIDENT=1 in the environment (opt-in until it has passed on a GPU): whether topk
// would load each row once into the shared memory of the blocks that share it and run 8-bit radix passes there
// (topk_resident.h) - where the rows fit the resident blocks, for k <= kSmallTopk only on rows longer than
// blockselect::kMinPart. Pass the answer to topk_workspace_bytes and topk.
bool topk_one_read(TopkDtype dtype, int64_t rows, int64_t n, int64_t k);

// Bytes of device workspace topk needs for `rows` rows of n elements and this k (1 <= k <= n < 2^32).
size_t topk_workspace_bytes(int64_t rows, int64_t n, int64_t k, bool sorted, bool one_read);

// x: `rows` contiguous rows of n elements of `dtype`; values (rows, k) in that dtype, indices (rows, k) int64.
// Radix select over the 64-bit keys (11/11/10 bits of value code, then of index only where ties need it), the
// row read twice and the later passes on the first bucket's candidates, rows split over several blocks when rows
// are few; or (one_read) the one-read select. Then a segmented sort of the k keys per row. No host sync.
cudaError_t topk(const void* x, TopkDtype dtype, int64_t rows, int64_t n, int64_t k, bool largest, bool sorted,
                 bool one_read, void* values, int64_t* indices, void* workspace, size_t workspace_bytes,
                 cudaStream_t stream);

// Largest k that topk_small handles. The block selection reads a row once, but about k (1 + ln(n / k)) keys pass
// its threshold and each is sorted into the queue by bitonic merges of 2K to 4K keys: at k = 256 on rows of 2^18
// that is already about as many shared-memory compare-exchanges per thread as elements read, and it grows like
// k log^2 k, while the radix select reads the row twice whatever k is. (Its seeding also needs k <= 256 threads.)
constexpr int64_t kSmallTopk = blockselect::kMaxK;

// Bytes of device workspace topk_small needs (zero unless rows are split over several blocks).
size_t topk_small_workspace_bytes(int64_t rows, int64_t n, int64_t k);

// Same contract as topk for 1 <= k <= kSmallTopk: one read of each row by a block-level selection (topk_select.h)
// with the results already sorted; long rows with few rows are split over blocks and merged by a second pass.
cudaError_t topk_small(const void* x, TopkDtype dtype, int64_t rows, int64_t n, int64_t k, bool largest,
                       void* values, int64_t* indices, void* workspace, size_t workspace_bytes,
                       cudaStream_t stream);

}  // namespace sr::cuda
