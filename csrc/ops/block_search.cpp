// Schema and CPU glue of the block-max pruned search (csrc/kernels/cpu/block_search.cpp). Every shape, dtype and
// offset end point is checked on each call; the contents of the offset and id arrays once per tensor version
// (list_check.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "kernels/cpu/block_search.h"
#include "kernels/cpu/list_search.h"
#include "kernels/cpu/simd.h"
#include "ops/csr_check.h"
#include "ops/list_check.h"
#include "ops/search_check.h"

namespace sr::ops {
namespace {

void check_1d(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, ": expected ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.is_contiguous() && t.device().is_cpu(), name,
                    ": expected a contiguous 1-D CPU tensor");
  TORCH_CHECK_VALUE(numel < 0 || t.numel() == numel, name, ": expected ", numel, " entries, got ", t.numel());
}

void check_offsets(const at::Tensor& ptr, int64_t total, const char* name) {
  TORCH_CHECK_VALUE(ptr[0].item<int64_t>() == 0 && ptr[-1].item<int64_t>() == total, name,
                    ": must run from 0 to ", total);
}

// Checks a forward index (offsets, term and weight arrays of ndocs documents over dim terms); returns its value type.
sr::cpu::ValueType check_forward(const at::Tensor& fwd_ptr, const at::Tensor& fwd_terms, const at::Tensor& fwd_weights,
                                 int64_t dim, int64_t block_size) {
  require_defined(fwd_ptr, "fwd_ptr", fwd_terms, "fwd_terms", fwd_weights, "fwd_weights");
  TORCH_CHECK_VALUE(fwd_ptr.dim() == 1 && fwd_ptr.numel() >= 1, "fwd_ptr: expected ndocs + 1 >= 1 entries");
  const int64_t ndocs = fwd_ptr.numel() - 1;
  TORCH_CHECK_VALUE(ndocs <= std::numeric_limits<int32_t>::max() - block_size, "fwd_ptr: too many documents");
  check_1d(fwd_ptr, at::kLong, ndocs + 1, "fwd_ptr");
  TORCH_CHECK_TYPE(fwd_terms.scalar_type() == at::kShort || fwd_terms.scalar_type() == at::kInt,
                   "fwd_terms: expected int16 (read as uint16) or int32, got ", fwd_terms.scalar_type());
  check_1d(fwd_terms, fwd_terms.scalar_type(), -1, "fwd_terms");
  TORCH_CHECK_VALUE(fwd_terms.scalar_type() == at::kInt || dim <= 65536, "fwd_terms: int16 terms need dim <= 65536");
  check_offsets(fwd_ptr, fwd_terms.numel(), "fwd_ptr");
  const auto wtype = value_type(fwd_weights, "fwd_weights");
  check_1d(fwd_weights, fwd_weights.scalar_type(), fwd_terms.numel(), "fwd_weights");
  return wtype;
}

// Pruning takes the weights for non-negative and the term scales for finite and positive. Min and max tell without
// a copy (NaN propagates into both).
void check_weights(const at::Tensor& fwd_weights) {
  if (fwd_weights.numel() == 0) return;
  auto [lo, hi] = at::aminmax(fwd_weights);
  const double l = lo.item<double>(), h = hi.item<double>();
  TORCH_CHECK_VALUE(l >= 0 && std::isfinite(h), "fwd_weights: must be finite and non-negative, got values in [", l,
                    ", ", h, "]");
}

void check_scale(const at::Tensor& scale) {
  if (scale.numel() == 0) return;
  auto [lo, hi] = at::aminmax(scale);
  const double l = lo.item<double>(), h = hi.item<double>();
  TORCH_CHECK_VALUE(l > 0 && std::isfinite(h), "scale: must be finite and > 0, got values in [", l, ", ", h, "]");
}

// Each weight within 255 x its term's scale (in float32). The maxima are stored in steps of the scale (255 at
// most): a weight above would be bounded too low, and safe search would prune it and still report its results
// complete. One parallel pass, no copies; the terms must have been checked against the scale's length.
void check_weights_within_scale(const at::Tensor& fwd_terms, const at::Tensor& fwd_weights, const at::Tensor& scale) {
  const float* sc = scale.data_ptr<float>();
  std::atomic<int64_t> first{fwd_terms.numel()};
  const auto scan = [&](const auto* terms, const auto* w) {
    at::parallel_for(0, fwd_terms.numel(), int64_t(1) << 16, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t t = std::is_same_v<std::decay_t<decltype(*terms)>, int16_t> ? uint16_t(terms[p]) : terms[p];
        if (float(w[p]) <= sc[t] * 255.0f) continue;
        lower_to(first, p);
        return;  // the range's first: later ones cannot be smaller
      }
    });
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fwd_weights.scalar_type(), "weights", [&] {
    const scalar_t* w = fwd_weights.data_ptr<scalar_t>();
    if (fwd_terms.scalar_type() == at::kShort) {
      scan(fwd_terms.data_ptr<int16_t>(), w);
    } else {
      scan(fwd_terms.data_ptr<int32_t>(), w);
    }
  });
  TORCH_CHECK_VALUE(first.load() == fwd_terms.numel(), "scale: must be at least each term's largest weight / 255 "
                    "(fwd_weights[", first.load(), "] is above 255 x its term's scale)");
}

void check_sizes(int64_t block_size, int64_t superblock) {
  TORCH_CHECK_VALUE(block_size >= 1 && block_size <= (int64_t(1) << 20), "block_size: must lie in [1, 2^20], got ",
                    block_size);
  TORCH_CHECK_VALUE(superblock >= 1 && superblock <= 1024, "superblock: must lie in [1, 1024], got ", superblock);
}

// The calling thread's search scratch (see BlockScratch), kept from call to call and only grown: allocating it per
// call cost a page fault per fresh page on first touch, about 1.1 ms of a 2 ms single-query search at 2M documents
// (4 MB of bounds and heap). It stays allocated with the thread: about 13 MB per thread at 8.8M documents.
sr::cpu::BlockScratch thread_scratch(int64_t slots, int64_t nsuper, int64_t superblock, int64_t nblocks) {
  thread_local std::vector<uint8_t> slot;  // all zero between queries: the kernels clear what they set
  thread_local std::vector<float> qslot(256), ub, blk_ub;
  thread_local std::vector<int32_t> order;
  thread_local std::vector<uint64_t> heap;
  const auto grow = [](auto& v, int64_t n) {
    if (int64_t(v.size()) < n) v.resize(n);
  };
  grow(slot, slots);
  grow(ub, nsuper);
  grow(blk_ub, superblock);
  grow(order, nsuper);
  grow(heap, nblocks);
  return {slot.data(), qslot.data(), ub.data(), order.data(), blk_ub.data(), heap.data()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_search_cpu(
    const at::Tensor& q_indptr, const at::Tensor& q_indices, const at::Tensor& q_values, at::TensorList index,
    int64_t block_size, int64_t superblock, int64_t k, double alpha, int64_t query_cut, int64_t num_threads,
    const std::optional<at::Tensor>& allowed, const std::optional<at::Tensor>& positions,
    const std::optional<at::TensorList>& lists_arg) {
  const at::TensorList lists = lists_arg.value_or(at::TensorList());
  TORCH_CHECK_VALUE(k >= 0 && k <= std::numeric_limits<int32_t>::max(), "k: must lie in [0, 2^31), got ", k);
  TORCH_CHECK_VALUE(lists.empty() || lists.size() == 13, "lists: expected none or 13 tensors (list_ptr, group_ptr, "
                    "group_docs, dir_ptr, dir_terms, dir_at, ent_ptr, ent_steps, ent_values, one_ptr, one_terms, "
                    "one_groups, one_values), got ", lists.size());
  const bool use_lists = !lists.empty();
  // Candidate lists rank by summaries that may miss terms, so stopping later than at the best summary left (alpha
  // above 1) buys recall there; block bounds are upper bounds, so alpha 1 is already exact.
  const double max_alpha = use_lists ? 16.0 : 1.0;
  TORCH_CHECK_VALUE(alpha > 0.0 && alpha <= max_alpha, "alpha: must lie in (0, ", max_alpha, "], got ", alpha);
  TORCH_CHECK_VALUE(!(use_lists && positions.has_value()), "positions: not with lists (a scan scores the listed "
                    "documents, lists choose candidates)");
  TORCH_CHECK_VALUE(query_cut >= 0, "query_cut: must be >= 0 (0: every term), got ", query_cut);
  check_sizes(block_size, superblock);
  TORCH_CHECK_VALUE(num_threads >= 0, "num_threads: must be >= 0 (0: all), got ", num_threads);
  TORCH_CHECK_VALUE(index.size() == 13, "index: expected 13 tensors (fwd_ptr, fwd_terms, fwd_weights, doc_ids, scale, "
                    "sb_dense_row, sb_dense, sb_ptr, sb_ids, sb_values, blk_ptr, blk_terms, blk_values), got ",
                    index.size());
  const auto &fwd_ptr = index[0], &fwd_terms = index[1], &fwd_weights = index[2], &doc_ids = index[3],
             &scale = index[4], &dense_row = index[5], &sb_dense = index[6], &sb_ptr = index[7], &sb_ids = index[8],
             &sb_values = index[9], &blk_ptr = index[10], &blk_terms = index[11], &blk_values = index[12];
  TORCH_CHECK_VALUE(sb_ptr.dim() == 1 && sb_ptr.numel() >= 1, "sb_ptr: expected dim + 1 >= 1 entries");
  const int64_t dim = sb_ptr.numel() - 1;
  const auto wtype = check_forward(fwd_ptr, fwd_terms, fwd_weights, dim, block_size);
  const int64_t ndocs = fwd_ptr.numel() - 1;
  const int64_t nblocks = (ndocs + block_size - 1) / block_size;
  const int64_t nsuper = (nblocks + superblock - 1) / superblock;
  check_1d(doc_ids, at::kLong, ndocs, "doc_ids");
  check_1d(scale, at::kFloat, dim, "scale");
  check_1d(dense_row, at::kLong, dim, "sb_dense_row");
  check_1d(sb_dense, at::kByte, -1, "sb_dense");
  TORCH_CHECK_VALUE(nsuper == 0 ? sb_dense.numel() == 0 : sb_dense.numel() % nsuper == 0,
                    "sb_dense: expected a multiple of ", nsuper, " bytes (one row per dense term)");
  const int64_t rows = nsuper ? sb_dense.numel() / nsuper : 0;
  check_1d(sb_ptr, at::kLong, dim + 1, "sb_ptr");
  check_1d(sb_ids, at::kInt, -1, "sb_ids");
  check_1d(sb_values, at::kByte, sb_ids.numel(), "sb_values");
  check_offsets(sb_ptr, sb_ids.numel(), "sb_ptr");
  check_1d(blk_ptr, at::kLong, nsuper + 1, "blk_ptr");
  TORCH_CHECK_TYPE(blk_terms.scalar_type() == fwd_terms.scalar_type(), "blk_terms: expected ",
                   fwd_terms.scalar_type(), " (the type of fwd_terms), got ", blk_terms.scalar_type());
  check_1d(blk_terms, blk_terms.scalar_type(), -1, "blk_terms");
  check_offsets(blk_ptr, blk_terms.numel(), "blk_ptr");
  check_1d(blk_values, at::kByte, blk_terms.numel() * superblock, "blk_values");
  check_once("block-max index", {fwd_ptr, fwd_terms, fwd_weights, doc_ids, scale, dense_row, sb_ptr, sb_ids, blk_ptr,
                                 blk_terms},
             {dim, block_size, superblock, rows}, [&] {
    check_weights(fwd_weights);
    check_scale(scale);
    check_lists(fwd_ptr, fwd_terms, dim, "fwd_ptr", "fwd_terms");
    check_weights_within_scale(fwd_terms, fwd_weights, scale);
    check_lists(sb_ptr, sb_ids, nsuper, "sb_ptr", "sb_ids");
    check_lists(blk_ptr, blk_terms, dim, "blk_ptr", "blk_terms");
    if (ndocs > 0) {
      auto [lo, hi] = at::aminmax(doc_ids);
      TORCH_CHECK_INDEX(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < ndocs, "doc_ids: ids must lie in [0, ",
                        ndocs, ")");
    }
    if (dim > 0) {
      auto [lo, hi] = at::aminmax(dense_row);
      TORCH_CHECK_VALUE(lo.item<int64_t>() >= -1 && hi.item<int64_t>() < rows, "sb_dense_row: rows must lie in [-1, ",
                        rows, ")");
    }
  });
  sr::cpu::TermLists tl{};
  if (use_lists) {
    const auto &list_ptr = lists[0], &group_ptr = lists[1], &group_docs = lists[2], &dir_ptr = lists[3],
               &dir_terms = lists[4], &dir_at = lists[5], &ent_ptr = lists[6], &ent_steps = lists[7],
               &ent_values = lists[8], &one_ptr = lists[9], &one_terms = lists[10], &one_groups = lists[11],
               &one_values = lists[12];
    TORCH_CHECK_VALUE(group_ptr.dim() == 1 && group_ptr.numel() >= 1, "group_ptr: expected ngroups + 1 >= 1 entries");
    const int64_t ngroups = group_ptr.numel() - 1;
    check_1d(list_ptr, at::kLong, dim + 1, "list_ptr");
    check_1d(group_ptr, at::kLong, ngroups + 1, "group_ptr");
    check_1d(group_docs, at::kInt, -1, "group_docs");
    check_1d(dir_ptr, at::kLong, dim + 1, "dir_ptr");
    TORCH_CHECK_TYPE(dir_terms.scalar_type() == fwd_terms.scalar_type(), "dir_terms: expected ",
                     fwd_terms.scalar_type(), " (the type of fwd_terms), got ", dir_terms.scalar_type());
    check_1d(dir_terms, dir_terms.scalar_type(), -1, "dir_terms");
    TORCH_CHECK_TYPE(one_terms.scalar_type() == fwd_terms.scalar_type(), "one_terms: expected ",
                     fwd_terms.scalar_type(), " (the type of fwd_terms), got ", one_terms.scalar_type());
    check_1d(one_terms, one_terms.scalar_type(), -1, "one_terms");
    check_1d(one_ptr, at::kLong, dim + 1, "one_ptr");
    check_1d(one_groups, at::kShort, one_terms.numel(), "one_groups");
    check_1d(one_values, at::kByte, one_terms.numel(), "one_values");
    check_1d(dir_at, at::kInt, dir_terms.numel(), "dir_at");
    check_1d(ent_ptr, at::kLong, dim + 1, "ent_ptr");
    check_1d(ent_steps, at::kByte, -1, "ent_steps");
    check_1d(ent_values, at::kByte, ent_steps.numel(), "ent_values");
    check_offsets(list_ptr, ngroups, "list_ptr");
    check_offsets(group_ptr, group_docs.numel(), "group_ptr");
    check_offsets(dir_ptr, dir_terms.numel(), "dir_ptr");
    check_offsets(ent_ptr, ent_steps.numel(), "ent_ptr");
    check_offsets(one_ptr, one_terms.numel(), "one_ptr");
    check_once("term lists", {list_ptr, group_ptr, group_docs, dir_ptr, dir_terms, dir_at, ent_ptr, ent_steps,
                              one_ptr, one_terms},
               {dim, ndocs}, [&] {
      for (const auto* p : {&list_ptr, &ent_ptr}) {
        TORCH_CHECK_VALUE((p->slice(0, 1) >= p->slice(0, 0, -1)).all().item<bool>(),
                          p == &list_ptr ? "list_ptr" : "ent_ptr", ": offsets must not decrease");
      }
      TORCH_CHECK_VALUE((list_ptr.slice(0, 1) - list_ptr.slice(0, 0, -1)).le(65536).all().item<bool>(),
                        "list_ptr: a term lists at most 65536 groups");
      check_lists(group_ptr, group_docs, ndocs, "group_ptr", "group_docs");
      check_lists(dir_ptr, dir_terms, dim, "dir_ptr", "dir_terms");
      check_lists(one_ptr, one_terms, dim, "one_ptr", "one_terms");
    });
    tl = {ngroups, list_ptr.data_ptr<int64_t>(), group_ptr.data_ptr<int64_t>(), group_docs.data_ptr<int32_t>(),
          group_docs.numel(), dir_ptr.data_ptr<int64_t>(), dir_terms.data_ptr(), dir_at.data_ptr<int32_t>(),
          dir_terms.numel(), ent_ptr.data_ptr<int64_t>(), ent_steps.data_ptr<uint8_t>(),
          ent_values.data_ptr<uint8_t>(), ent_steps.numel(), one_ptr.data_ptr<int64_t>(), one_terms.data_ptr(),
          reinterpret_cast<const uint16_t*>(one_groups.data_ptr()), one_values.data_ptr<uint8_t>(), one_terms.numel()};
  }
  check_csr(q_indptr, q_indices, &q_values, dim, "q", c10::kCPU);
  const uint8_t* mask = allowed_mask(allowed, ndocs, c10::kCPU);
  const int64_t* pos = nullptr;
  int64_t npos = 0;
  if (positions.has_value()) {  // checked on every call: scanning them costs far more than this
    const auto& p = *positions;
    check_1d(p, at::kLong, -1, "positions");
    npos = p.numel();
    if (npos > 0) {
      auto [lo, hi] = at::aminmax(p);
      TORCH_CHECK_INDEX(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < ndocs, "positions: must lie in [0, ", ndocs,
                        ") (stored positions of documents)");
      TORCH_CHECK_VALUE(npos == 1 || (p.slice(0, 1) > p.slice(0, 0, -1)).all().item<bool>(),
                        "positions: must be strictly increasing");
    }
    pos = p.data_ptr<int64_t>();
  }

  const int64_t nq = q_indptr.numel() - 1;
  auto out_scores = at::full({nq, k}, -std::numeric_limits<float>::infinity(), q_values.options().dtype(at::kFloat));
  auto out_ids = at::full({nq, k}, -1, q_indptr.options());
  auto complete = at::zeros({nq}, q_indptr.options().dtype(at::kBool));
  auto visited = at::zeros({nq}, q_indptr.options());
  if (nq == 0 || k == 0 || ndocs == 0) return {out_scores, out_ids, complete, visited};

  const sr::cpu::BlockMaxIndex ix{ndocs, dim, block_size, nblocks, superblock, nsuper, fwd_terms.numel(),
                                  fwd_ptr.data_ptr<int64_t>(), fwd_terms.data_ptr(),
                                  fwd_terms.scalar_type() == at::kShort, fwd_weights.data_ptr(), wtype,
                                  doc_ids.data_ptr<int64_t>(), scale.data_ptr<float>(),
                                  rows, sb_ids.numel(), dense_row.data_ptr<int64_t>(), sb_dense.data_ptr<uint8_t>(),
                                  sb_ptr.data_ptr<int64_t>(), sb_ids.data_ptr<int32_t>(), sb_values.data_ptr<uint8_t>(),
                                  blk_terms.numel(), blk_ptr.data_ptr<int64_t>(), blk_terms.data_ptr(),
                                  blk_values.data_ptr<uint8_t>()};
  auto qp = q_indptr.contiguous();
  auto qt = q_indices.to(at::kLong).contiguous();
  auto qw = q_values.to(at::kFloat).contiguous();
  const int64_t* qptr = qp.data_ptr<int64_t>();
  float* os = out_scores.data_ptr<float>();
  int64_t* oi = out_ids.data_ptr<int64_t>();
  bool* oc = complete.data_ptr<bool>();
  int64_t* ov = visited.data_ptr<int64_t>();
  const int64_t threads = std::min(num_threads > 0 ? num_threads : int64_t(at::get_num_threads()), nq);
  std::atomic<int64_t> next{0};
  const bool bounds = !positions.has_value() && !use_lists;  // else a scan of the listed positions, or lists
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    const sr::cpu::BlockScratch scratch = thread_scratch(std::max<int64_t>(dim + 1, 65536), bounds ? nsuper : 0,
                                                         bounds ? superblock : 0, bounds ? nblocks : 0);
    thread_local std::vector<uint8_t> seen;  // all zero between queries, as acc
    thread_local std::vector<float> acc(65536);
    thread_local std::vector<uint64_t> candidates;
    thread_local std::vector<int64_t> scored;
    thread_local std::vector<sr::cpu::ListSpan> spans;
    thread_local std::vector<sr::cpu::ListMatch> matches;
    if (use_lists && int64_t(seen.size()) < ndocs) seen.resize(ndocs);
    const sr::cpu::ListScratch list_scratch{seen.data(), acc.data(), &candidates, &scored, &spans, &matches};
    for (int64_t i = next++; i < nq; i = next++) {
      const sr::cpu::SearchQuery query{qt.data_ptr<int64_t>() + qptr[i], qw.data_ptr<float>() + qptr[i],
                                       qptr[i + 1] - qptr[i]};
      if (use_lists) {
        oc[i] = SR_SIMD_DISPATCH(list_search_query, ix, tl, query, k, float(alpha), query_cut, mask, scratch,
                                 list_scratch, os + i * k, oi + i * k, ov + i);
      } else if (!bounds) {
        oc[i] = SR_SIMD_DISPATCH(scan_positions, ix, query, k, pos, npos, mask, scratch, os + i * k, oi + i * k,
                                 ov + i);
      } else {
        oc[i] = SR_SIMD_DISPATCH(block_search_query, ix, query, k, float(alpha), query_cut, mask, scratch,
                                 os + i * k, oi + i * k, ov + i);
      }
    }
  });
  TORCH_CHECK_VALUE(!(visited < 0).any().item<bool>(), "block_search: the index changed after it was checked "
                    "(written behind torch's back, e.g. through a numpy view or a memory-mapped file): offsets or "
                    "ids are invalid");
  return {out_scores, out_ids, complete, visited};
}

// The maxima of a forward index (see term_maxima and superblock_maxima in the kernel header): (scale, sb_dense_row,
// sb_dense, sb_ptr, sb_ids, sb_values, blk_ptr, blk_terms, blk_values). Checks everything it reads: it runs once per
// build.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
block_maxima_cpu(const at::Tensor& fwd_ptr, const at::Tensor& fwd_terms, const at::Tensor& fwd_weights, int64_t dim,
                 int64_t block_size, int64_t superblock, double dense_fraction) {
  TORCH_CHECK_VALUE(dim >= 1 && dim < (int64_t(1) << 40), "dim: must lie in [1, 2^40), got ", dim);
  check_sizes(block_size, superblock);
  TORCH_CHECK_VALUE(dense_fraction > 0.0 && dense_fraction <= 1.0, "dense_fraction: must lie in (0, 1], got ",
                    dense_fraction);
  const auto wtype = check_forward(fwd_ptr, fwd_terms, fwd_weights, dim, block_size * superblock);
  const int64_t ndocs = fwd_ptr.numel() - 1;
  check_lists(fwd_ptr, fwd_terms, dim, "fwd_ptr", "fwd_terms");
  check_weights(fwd_weights);
  const int64_t group = block_size * superblock;
  const int64_t nsuper = (ndocs + group - 1) / group;
  const int64_t min_dense = std::max<int64_t>(1, int64_t(std::ceil(dense_fraction * double(nsuper))));
  const auto opts = fwd_ptr.options();
  auto scale = at::empty({dim}, opts.dtype(at::kFloat));
  auto dense_row = at::empty({dim}, opts);
  auto ptr = at::empty({dim + 1}, opts);
  const bool t16 = fwd_terms.scalar_type() == at::kShort;
  const int64_t* fp = fwd_ptr.data_ptr<int64_t>();
  const void *ft = fwd_terms.data_ptr(), *fw = fwd_weights.data_ptr();
  const int64_t rows = SR_SIMD_DISPATCH(term_maxima, fp, ft, t16, fw, wtype, ndocs, dim, group, min_dense,
                                        scale.data_ptr<float>(), dense_row.data_ptr<int64_t>(), ptr.data_ptr<int64_t>(),
                                        nullptr, nullptr, nullptr);
  const int64_t entries = ptr[-1].item<int64_t>();
  auto dense = at::zeros({rows * nsuper}, opts.dtype(at::kByte));
  auto ids = at::empty({entries}, opts.dtype(at::kInt));
  auto values = at::empty({entries}, opts.dtype(at::kByte));
  SR_SIMD_DISPATCH(term_maxima, fp, ft, t16, fw, wtype, ndocs, dim, group, min_dense, scale.data_ptr<float>(),
                   dense_row.data_ptr<int64_t>(), ptr.data_ptr<int64_t>(), dense.data_ptr<uint8_t>(),
                   ids.data_ptr<int32_t>(), values.data_ptr<uint8_t>());

  // Superblock-major block maxima: counted, then filled, each superblock independently. A superblock of one block
  // needs none (its bounds are the block's).
  const float* sc = scale.data_ptr<float>();
  auto blk_ptr = at::zeros({nsuper + 1}, opts);
  auto blk_terms = at::empty({0}, opts.dtype(fwd_terms.scalar_type()));
  auto blk_values = at::empty({0}, opts.dtype(at::kByte));
  if (superblock > 1) {
    int64_t* bp = blk_ptr.data_ptr<int64_t>();
    at::parallel_for(0, nsuper, 256, [&](int64_t lo, int64_t hi) {
      SR_SIMD_DISPATCH(superblock_maxima, fp, ft, t16, fw, wtype, ndocs, dim, block_size, superblock, sc, lo, hi,
                       bp + lo + 1, nullptr, nullptr, nullptr);
    });
    blk_ptr.cumsum_(0);
    blk_terms.resize_({bp[nsuper]});
    blk_values.resize_({bp[nsuper] * superblock});
    void* bt = blk_terms.data_ptr();
    uint8_t* bv = blk_values.data_ptr<uint8_t>();
    at::parallel_for(0, nsuper, 256, [&](int64_t lo, int64_t hi) {
      SR_SIMD_DISPATCH(superblock_maxima, fp, ft, t16, fw, wtype, ndocs, dim, block_size, superblock, sc, lo, hi,
                       nullptr, bp, bt, bv);
    });
  }
  return {scale, dense_row, dense, ptr, ids, values, blk_ptr, blk_terms, blk_values};
}

// Term lists of a forward index (TermLists, built with term_top_documents, cluster_documents and group_summary of
// the kernel header): (list_ptr, group_ptr, group_docs, dir_ptr, dir_terms, dir_at, ent_ptr, ent_steps,
// ent_values, one_ptr, one_terms, one_groups, one_values). Checks everything it reads: it runs once per build.
std::vector<at::Tensor> term_lists_cpu(
    const at::Tensor& fwd_ptr, const at::Tensor& fwd_terms, const at::Tensor& fwd_weights, const at::Tensor& scale,
    int64_t list_len, int64_t group, double summary_energy, int64_t doc_cut) {
  require_defined(scale, "scale");
  check_1d(scale, at::kFloat, -1, "scale");
  const int64_t dim = scale.numel();
  TORCH_CHECK_VALUE(dim >= 1, "scale: expected one entry per term (dim >= 1)");
  TORCH_CHECK_VALUE(list_len >= 1 && list_len <= 65536, "list_len: must lie in [1, 65536], got ", list_len);
  TORCH_CHECK_VALUE(group >= 1 && group <= (int64_t(1) << 20), "group: must lie in [1, 2^20], got ", group);
  TORCH_CHECK_VALUE(summary_energy > 0.0 && summary_energy <= 1.0, "summary_energy: must lie in (0, 1], got ",
                    summary_energy);
  TORCH_CHECK_VALUE(doc_cut >= 1, "doc_cut: must be >= 1, got ", doc_cut);
  const auto wtype = check_forward(fwd_ptr, fwd_terms, fwd_weights, dim, 1);
  check_lists(fwd_ptr, fwd_terms, dim, "fwd_ptr", "fwd_terms");
  const bool t16 = fwd_terms.scalar_type() == at::kShort;
  check_scale(scale);
  check_weights(fwd_weights);
  check_weights_within_scale(fwd_terms, fwd_weights, scale);
  const int64_t ndocs = fwd_ptr.numel() - 1;
  const int64_t* fp = fwd_ptr.data_ptr<int64_t>();
  const void *ft = fwd_terms.data_ptr(), *fw = fwd_weights.data_ptr();
  const float* sc = scale.data_ptr<float>();
  // Terms split evenly over the threads; each reads the whole forward index once.
  std::vector<std::vector<int32_t>> docs(dim);
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), dim));
  at::parallel_for(0, threads, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const int64_t t_lo = dim * c / threads, t_hi = dim * (c + 1) / threads;
      SR_SIMD_DISPATCH(term_top_documents, fp, ft, t16, fw, wtype, ndocs, list_len, t_lo, t_hi, docs.data() + t_lo);
    }
  });
  // Groups and their summaries, per term (each term's into its own vectors, then laid out in term order).
  std::vector<std::vector<int64_t>> sizes(dim), sum_sizes(dim);
  std::vector<std::vector<int32_t>> sterms(dim);
  std::vector<std::vector<uint8_t>> svalues(dim);
  at::parallel_for(0, dim, 64, [&](int64_t lo, int64_t hi) {
    std::vector<float> gmax(dim, -1.0f);
    std::vector<int32_t> term_slot(dim, -1);
    for (int64_t t = lo; t < hi; ++t) {
      SR_SIMD_DISPATCH(cluster_documents, fp, ft, t16, fw, wtype, docs[t].data(), int64_t(docs[t].size()), group,
                       doc_cut, term_slot, sizes[t]);
      int64_t a = 0;
      for (const int64_t n : sizes[t]) {
        const size_t before = sterms[t].size();
        SR_SIMD_DISPATCH(group_summary, fp, ft, t16, fw, wtype, docs[t].data() + a, n, sc, summary_energy, gmax,
                         sterms[t], svalues[t]);
        sum_sizes[t].push_back(int64_t(sterms[t].size() - before));
        a += n;
      }
    }
  });
  // Each list's summaries transposed: (term, group in the list, maximum) sorted by term, then group; a term of a
  // single group goes to the single entries instead of the directory.
  std::vector<std::vector<int32_t>> dterms(dim), dat(dim), oterms(dim);
  std::vector<std::vector<uint16_t>> ogroups(dim);
  std::vector<std::vector<uint8_t>> esteps(dim), evalues(dim), ovalues(dim);
  at::parallel_for(0, dim, 64, [&](int64_t lo, int64_t hi) {
    std::vector<std::tuple<int32_t, uint16_t, uint8_t>> entries;
    for (int64_t t = lo; t < hi; ++t) {
      entries.clear();
      for (size_t g = 0, e = 0; g < sum_sizes[t].size(); ++g) {
        for (int64_t i = 0; i < sum_sizes[t][g]; ++i, ++e) entries.emplace_back(sterms[t][e], uint16_t(g), svalues[t][e]);
      }
      std::vector<int32_t>().swap(sterms[t]);
      std::vector<uint8_t>().swap(svalues[t]);
      std::sort(entries.begin(), entries.end());
      for (size_t e = 0, run; e < entries.size(); e += run) {
        const int32_t u = std::get<0>(entries[e]);
        for (run = 1; e + run < entries.size() && std::get<0>(entries[e + run]) == u;) ++run;
        if (run == 1) {
          oterms[t].push_back(u);
          ogroups[t].push_back(std::get<1>(entries[e]));
          ovalues[t].push_back(std::get<2>(entries[e]));
          continue;
        }
        dterms[t].push_back(u);
        dat[t].push_back(int32_t(esteps[t].size()));
        for (size_t i = e, previous = 0; i < e + run; ++i) {  // steps of at most 255: filler entries of value 0
          size_t step = std::get<1>(entries[i]) - previous;
          for (; step > 255; step -= 255) {
            esteps[t].push_back(255);
            evalues[t].push_back(0);
          }
          esteps[t].push_back(uint8_t(step));
          evalues[t].push_back(std::get<2>(entries[i]));
          previous = std::get<1>(entries[i]);
        }
      }
    }
  });
  const auto opts = fwd_ptr.options();
  auto list_ptr = at::zeros({dim + 1}, opts), dir_ptr = at::zeros({dim + 1}, opts), ent_ptr = at::zeros({dim + 1}, opts);
  auto one_ptr = at::zeros({dim + 1}, opts);
  int64_t *lp = list_ptr.data_ptr<int64_t>(), *dp = dir_ptr.data_ptr<int64_t>(), *ep = ent_ptr.data_ptr<int64_t>();
  int64_t* op = one_ptr.data_ptr<int64_t>();
  std::vector<int64_t> doc_at(dim + 1, 0);
  for (int64_t t = 0; t < dim; ++t) {
    lp[t + 1] = lp[t] + int64_t(sizes[t].size());
    dp[t + 1] = dp[t] + int64_t(dterms[t].size());
    ep[t + 1] = ep[t] + int64_t(esteps[t].size());
    op[t + 1] = op[t] + int64_t(oterms[t].size());
    doc_at[t + 1] = doc_at[t] + int64_t(docs[t].size());
  }
  const int64_t ngroups = lp[dim];
  auto group_ptr = at::zeros({ngroups + 1}, opts);
  int64_t* gp = group_ptr.data_ptr<int64_t>();
  for (int64_t t = 0; t < dim; ++t) {
    for (int64_t g = lp[t]; g < lp[t + 1]; ++g) gp[g + 1] = gp[g] + sizes[t][g - lp[t]];
  }
  auto group_docs = at::empty({doc_at[dim]}, opts.dtype(at::kInt));
  auto dir_terms = at::empty({dp[dim]}, opts.dtype(fwd_terms.scalar_type()));
  auto dir_at = at::empty({dp[dim]}, opts.dtype(at::kInt));
  auto ent_steps = at::empty({ep[dim]}, opts.dtype(at::kByte));
  auto ent_values = at::empty({ep[dim]}, opts.dtype(at::kByte));
  auto one_terms = at::empty({op[dim]}, opts.dtype(fwd_terms.scalar_type()));
  auto one_groups = at::empty({op[dim]}, opts.dtype(at::kShort));
  auto one_values = at::empty({op[dim]}, opts.dtype(at::kByte));
  at::parallel_for(0, dim, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      std::copy(docs[t].begin(), docs[t].end(), group_docs.data_ptr<int32_t>() + doc_at[t]);
      std::copy(dat[t].begin(), dat[t].end(), dir_at.data_ptr<int32_t>() + dp[t]);
      std::copy(esteps[t].begin(), esteps[t].end(), ent_steps.data_ptr<uint8_t>() + ep[t]);
      std::copy(evalues[t].begin(), evalues[t].end(), ent_values.data_ptr<uint8_t>() + ep[t]);
      std::copy(ogroups[t].begin(), ogroups[t].end(), reinterpret_cast<uint16_t*>(one_groups.data_ptr()) + op[t]);
      std::copy(ovalues[t].begin(), ovalues[t].end(), one_values.data_ptr<uint8_t>() + op[t]);
      const auto put_terms = [t16](const std::vector<int32_t>& from, at::Tensor& to, int64_t base) {
        if (t16) {
          auto* out = reinterpret_cast<uint16_t*>(to.data_ptr()) + base;
          for (size_t j = 0; j < from.size(); ++j) out[j] = uint16_t(from[j]);
        } else {
          std::copy(from.begin(), from.end(), to.data_ptr<int32_t>() + base);
        }
      };
      put_terms(dterms[t], dir_terms, dp[t]);
      put_terms(oterms[t], one_terms, op[t]);
    }
  });
  return {list_ptr,   group_ptr, group_docs, dir_ptr,   dir_terms, dir_at,    ent_ptr,
          ent_steps, ent_values, one_ptr,   one_terms, one_groups, one_values};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparse_retrieval, m) {
  m.def("block_search(Tensor q_indptr, Tensor q_indices, Tensor q_values, Tensor[] index, int block_size, "
        "int superblock, int k, float alpha, int query_cut, int num_threads, Tensor? allowed=None, "
        "Tensor? positions=None, Tensor[]? lists=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("term_lists(Tensor fwd_ptr, Tensor fwd_terms, Tensor fwd_weights, Tensor scale, int list_len, int group, "
        "float summary_energy, int doc_cut) -> Tensor[]");
  m.def("block_maxima(Tensor fwd_ptr, Tensor fwd_terms, Tensor fwd_weights, int dim, int block_size, int superblock, "
        "float dense_fraction) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparse_retrieval, CPU, m) {
  m.impl("block_search", &block_search_cpu);
  m.impl("block_maxima", &block_maxima_cpu);
  m.impl("term_lists", &term_lists_cpu);
}

}  // namespace sr::ops
