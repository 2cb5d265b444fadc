// Content checks of the offset and id arrays that raw ops index with (posting lists, forward index, block maxima).
// A full check reads the whole index, so it runs once per tensor version: the version counter moves with every
// in-place torch op, and a tensor freed and reallocated at the same address is a different object (tracked by weak
// reference), so any change made through torch is checked again. Changes behind torch's back (writes through a numpy
// view, a file edited under a memory map) are not seen here; the kernels bound their own reads and writes, so those
// give an error or wrong results, never a stray memory access.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <atomic>
#include <deque>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace sr::ops {

namespace detail {

template <class Id>
int64_t first_bad_list(const int64_t* ptr, int64_t n, const Id* ids, int64_t nids, int64_t bound) {
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
  at::parallel_for(0, n, 4096, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi && i < bad.load(std::memory_order_relaxed); ++i) {
      const int64_t a = ptr[i], b = ptr[i + 1];
      bool ok = 0 <= a && a <= b && b <= nids;
      for (int64_t p = a; ok && p < b; ++p) {
        const int64_t id = int64_t(ids[p]);
        ok = id >= 0 && id < bound && (p == a || int64_t(ids[p - 1]) < id);
      }
      if (!ok) {
        int64_t cur = bad.load();
        while (i < cur && !bad.compare_exchange_weak(cur, i)) {
        }
        return;
      }
    }
  });
  return bad.load() == std::numeric_limits<int64_t>::max() ? -1 : bad.load();
}

}  // namespace detail

// Checks lists [ptr[i], ptr[i + 1]) of `ids` (int16 read as uint16, int32 or int64): offsets non-decreasing within
// [0, ids.numel()], ids in [0, bound) and strictly ascending within each list. CPU tensors are read in place, others
// copied to the CPU.
inline void check_lists(const at::Tensor& ptr, const at::Tensor& ids, int64_t bound, const std::string& ptr_name,
                        const std::string& ids_name) {
  const auto p = ptr.to(at::kCPU, at::kLong).contiguous();
  const auto v = ids.to(at::kCPU).contiguous();
  const int64_t n = p.numel() - 1;
  int64_t bad = -1;
  switch (v.scalar_type()) {
    case at::kShort:
      bad = detail::first_bad_list(p.data_ptr<int64_t>(), n, reinterpret_cast<const uint16_t*>(v.data_ptr<int16_t>()),
                                   v.numel(), bound);
      break;
    case at::kInt: bad = detail::first_bad_list(p.data_ptr<int64_t>(), n, v.data_ptr<int32_t>(), v.numel(), bound);
      break;
    case at::kLong: bad = detail::first_bad_list(p.data_ptr<int64_t>(), n, v.data_ptr<int64_t>(), v.numel(), bound);
      break;
    default: TORCH_CHECK_TYPE(false, ids_name, ": expected int16, int32 or int64 ids, got ", v.scalar_type());
  }
  if (bad < 0) return;
  const int64_t a = p[bad].item<int64_t>(), b = p[bad + 1].item<int64_t>();
  TORCH_CHECK_VALUE(0 <= a && a <= b && b <= v.numel(), ptr_name, ": offsets must be non-decreasing within [0, ",
                    v.numel(), "]; entries ", bad, " and ", bad + 1, " are ", a, " and ", b);
  TORCH_CHECK_INDEX(false, ids_name, ": list ", bad, " must hold ids in [0, ", bound,
                    ") in strictly ascending order (no repeats)");
}

// The identity of a set of tensors for caches of what was checked or derived from them: the same objects (weak
// references: a live one pins the object's memory, so an equal address means the same object), data pointers,
// sizes, dtypes and versions, plus `extra` numbers. Inference tensors have no version counter: no key.
class TensorKey {
 public:
  static std::optional<TensorKey> of(const std::vector<at::Tensor>& tensors, std::vector<int64_t> extra) {
    TensorKey key;
    key.stamp_ = std::move(extra);
    for (const auto& t : tensors) {
      if (t.is_inference()) return std::nullopt;
      key.stamp_.insert(key.stamp_.end(), {int64_t(t._version()), int64_t(reinterpret_cast<uintptr_t>(t.data_ptr())),
                                           t.numel(), int64_t(t.scalar_type()), t.dim()});
      // `t.data = other` swaps sizes and strides without a new version: what was checked or derived for one
      // shape must not serve another
      key.stamp_.insert(key.stamp_.end(), t.sizes().begin(), t.sizes().end());
      key.stamp_.insert(key.stamp_.end(), t.strides().begin(), t.strides().end());
      key.refs_.emplace_back(t.getIntrusivePtr());
    }
    return key;
  }
  bool operator==(const TensorKey& o) const {
    if (stamp_ != o.stamp_ || refs_.size() != o.refs_.size()) return false;
    for (size_t i = 0; i < refs_.size(); ++i) {
      if (expired() || o.expired() || refs_[i]._unsafe_get_target() != o.refs_[i]._unsafe_get_target()) return false;
    }
    return true;
  }
  bool expired() const {
    return std::any_of(refs_.begin(), refs_.end(), [](const Ref& r) { return r.expired(); });
  }

 private:
  using Ref = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  std::vector<Ref> refs_;
  std::vector<int64_t> stamp_;
};

// Runs check() unless the same tensors (TensorKey), with the same `extra` numbers, passed a check of this `kind`
// before. Inference tensors are checked every time.
template <class Check>
void check_once(const std::string& kind, const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& extra,
                Check&& check) {
  struct Entry {
    std::string kind;
    TensorKey key;
  };
  static std::mutex mutex;
  static std::deque<Entry> seen;  // most recently used last; bounded
  constexpr size_t kMaxEntries = 4096;  // entries hold weak references only: a few hundred bytes each

  std::optional<TensorKey> key = TensorKey::of(tensors, extra);
  if (!key) {
    check();
    return;
  }
  auto same = [&](const Entry& e) { return e.kind == kind && e.key == *key; };
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto hit = std::find_if(seen.rbegin(), seen.rend(), same);
    if (hit != seen.rend()) {  // move to the back: a hit is recently used
      Entry e = std::move(*hit);
      seen.erase(std::next(hit).base());
      seen.push_back(std::move(e));
      return;
    }
  }
  check();
  std::lock_guard<std::mutex> lock(mutex);
  seen.erase(std::remove_if(seen.begin(), seen.end(), [](const Entry& e) { return e.key.expired(); }), seen.end());
  if (seen.size() == kMaxEntries) seen.pop_front();
  seen.push_back({kind, std::move(*key)});
}

}  // namespace sr::ops
