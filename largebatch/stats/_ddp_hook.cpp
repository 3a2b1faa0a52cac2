// DDP's default reduction (the mean over workers) with the gradient statistics
// taken in the same passes, as a C++ communication hook.
//
// The Python hook of ddp.py does the same work in three passes over each
// bucket (the local norms, the division by the world size, and later
// ||p.grad||^2) and pays for a Python call per bucket: 10-11% of a small
// MLP's step under 2-process gloo DDP, against 4-6% for this hook
// (benchmarks/grad_stats_ddp.py, per-worker statistics). Here:
//   * sample="worker": before the all-reduce, one pass per parameter reads
//     its local gradient, adds up its squares (the per-worker statistic) and
//     writes it divided by the world size; after it, the future's callback
//     reads the squared norms of the averaged gradients (B = ||p.grad||^2)
//     while the bucket is in cache, so DDP's end-of-backward wait covers it;
//   * sample="micro_batch" (its norms come from the accumulation hook,
//     _accumulate.cpp): the local sums are all-reduced as they are, and the
//     callback divides them by the world size and takes B in one pass;
//   * the step's statistics vector rides on the last bucket's all-reduce (one
//     collective per step, as in ddp.py); Python is called once per step, to
//     fill it.
// Formulas: stats.md, "Per-worker statistics under DDP". Loaded by _native.py.

#include <torch/extension.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>
#include <torch/csrc/utils/pybind.h>

#include "_kernels.h"

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <unordered_map>
#include <utility>
#include <vector>

namespace largebatch {
namespace {

// One tracked parameter's gradient inside a bucket.
struct Segment {
  int64_t slot;    // index into the statistics vectors
  int64_t offset;  // elements from the start of the bucket's buffer
  int64_t length;
};

// Squared norms of `segments` of `data`, written into `vector` (float or
// double); with `out`, `out` = `data` * scale in the same pass, and then
// with `square_output` the norms are those of `out`.
void segment_sq_norms(const at::Tensor& data, const std::vector<Segment>& segments, const at::Tensor& vector,
                      at::Tensor* out, double scale, bool square_output = false) {
  AT_DISPATCH_FLOATING_TYPES(data.scalar_type(), "largebatch_segment_sq_norms", [&] {
    // const_cast: only written through when `out` is `data` (in place).
    scalar_t* x = const_cast<scalar_t*>(data.const_data_ptr<scalar_t>());
    scalar_t* y = out != nullptr ? out->data_ptr<scalar_t>() : nullptr;
    const auto factor = static_cast<scalar_t>(scale);
    for (const Segment& s : segments) {
      scalar_t* xs = x + s.offset;
      double value;
      if (y == nullptr) {
        value = sum_of_squares<scalar_t, Write::kNothing>(xs, nullptr, s.length, factor);
      } else if (y == x) {
        value = square_output ? sum_of_squares<scalar_t, Write::kInPlace, true>(xs, nullptr, s.length, factor)
                              : sum_of_squares<scalar_t, Write::kInPlace>(xs, nullptr, s.length, factor);
      } else {
        value = square_output ? sum_of_squares<scalar_t, Write::kCopy, true>(xs, y + s.offset, s.length, factor)
                              : sum_of_squares<scalar_t, Write::kCopy>(xs, y + s.offset, s.length, factor);
      }
      if (s.slot < 0) continue;
      store_slot(vector, s.slot, value);
    }
  });
}

}  // namespace

// What the hook and the Python engine share: one per GradientStatistics.
class HookState {
 public:
  HookState(c10::intrusive_ptr<c10d::ProcessGroup> group, const std::vector<at::Tensor>& params,
            at::Tensor local_sq, at::Tensor grad_sq, bool measure_local, int64_t vector_size,
            py::function fill_statistics)
      : group_(std::move(group)),
        world_(group_->getSize()),
        local_sq_(std::move(local_sq)),
        grad_sq_(std::move(grad_sq)),
        measure_local_(measure_local),
        vector_size_(vector_size),
        fill_statistics_(std::move(fill_statistics)) {
    TORCH_CHECK(local_sq_.is_contiguous() && grad_sq_.is_contiguous(), "statistics vectors must be contiguous");
    for (size_t k = 0; k < params.size(); ++k) index_[params[k].unsafeGetTensorImpl()] = static_cast<int64_t>(k);
  }

  ~HookState() {
    if (Py_IsInitialized()) {
      py::gil_scoped_acquire gil;
      fill_statistics_ = py::function();
    }
  }

  c10::intrusive_ptr<c10::ivalue::Future> run(c10d::GradBucket& bucket) {
    at::Tensor buffer = bucket.getBufferRef();
    TORCH_CHECK(buffer.device().is_cpu() && buffer.is_contiguous() && !buffer.is_sparse(),
                "largebatch's compiled DDP hook handles dense CPU buckets only");
    const int64_t n = buffer.numel();
    const double inv_world = 1.0 / static_cast<double>(world_);
    if (!active_) {  // after remove(): DDP's mean, nothing measured
      buffer.mul_(inv_world);
      return all_reduce(buffer);
    }
    const bool carries = bucket.isLast();
    std::vector<Segment> segments = segments_of(bucket, buffer);

    // What is all-reduced: the bucket, or (last bucket, same dtype) a copy of
    // it followed by the statistics vector.
    at::Tensor sent = buffer, statistics;
    const bool rides = carries && local_sq_.scalar_type() == buffer.scalar_type();
    if (rides) {
      sent = at::empty({n + vector_size_}, buffer.options());
      statistics = sent.narrow(0, n, vector_size_);
    } else if (carries) {
      statistics = at::empty({vector_size_}, local_sq_.options());
    }
    // With the local norms to take, the pass that reads the bucket for them
    // also divides it by the world size, as DDP does. Without, the sum over
    // workers is divided afterwards, in the pass that reads B: one pass
    // fewer (the same mean for a world size that is a power of two;
    // otherwise it may differ from DDP's in the last bit).
    const bool tiled = covers(segments, n);
    const bool divide_after = !measure_local_ && tiled;
    const double before = divide_after ? 1.0 : inv_world;
    at::Tensor sent_part = sent.narrow(0, 0, n);  // the bucket as all-reduced
    if (measure_local_ && tiled) {
      segment_sq_norms(buffer, segments, local_sq_, &sent_part, before);
    } else {
      if (measure_local_) segment_sq_norms(buffer, segments, local_sq_, nullptr, 1.0);
      if (before != 1.0) {
        at::mul_out(sent_part, buffer, before);
      } else if (rides) {
        sent_part.copy_(buffer);
      }
    }
    if (carries) {
      fill(statistics);  // the Python side completes the vector (the local norms are in it)
      if (!rides) pending_ = all_reduce(statistics);  // first, in the same order on every rank
    }
    c10::intrusive_ptr<c10::ivalue::Future> reduced = all_reduce(sent);
    if (rides) pending_ = reduced;
    // Every tracked parameter is in a bucket (the engine checks), so each
    // synchronised backward rewrites all of grad_sq.
    at::Tensor grad_sq = grad_sq_;
    return reduced->then(
        [n, divide_after, inv_world, segments = std::move(segments), grad_sq](c10::ivalue::Future& future) {
          at::Tensor averaged = future.value().toTensorVector()[0].narrow(0, 0, n);
          if (divide_after) {  // the mean and B in one pass
            segment_sq_norms(averaged, segments, grad_sq, &averaged, inv_world, /*square_output=*/true);
          } else {  // B, while the bucket is in cache
            segment_sq_norms(averaged, segments, grad_sq, nullptr, 1.0);
          }
          return c10::IValue(averaged);
        },
        c10::TensorType::get());
  }

  // Waits for the step's statistics all-reduce (the GIL released meanwhile).
  void wait() {
    if (!pending_) return;
    c10::intrusive_ptr<c10::ivalue::Future> pending = std::exchange(pending_, {});
    py::gil_scoped_release no_gil;
    pending->wait();
  }

  bool active_ = true;

 private:
  std::vector<Segment> segments_of(c10d::GradBucket& bucket, const at::Tensor& buffer) const {
    std::vector<Segment> segments;
    const std::vector<at::Tensor> grads = bucket.getGradients();
    const std::vector<at::Tensor> params = bucket.getParameters();
    const auto* base = static_cast<const char*>(buffer.const_data_ptr());
    for (size_t j = 0; j < grads.size(); ++j) {
      auto it = index_.find(params[j].unsafeGetTensorImpl());
      const int64_t offset = (static_cast<const char*>(grads[j].const_data_ptr()) - base) /
                             static_cast<int64_t>(buffer.element_size());
      // Parameters outside params= get slot -1: divided, not measured.
      segments.push_back({it == index_.end() ? -1 : it->second, offset, grads[j].numel()});
    }
    return segments;
  }

  // Whether the segments tile the whole buffer (then one pass divides it all).
  static bool covers(const std::vector<Segment>& segments, int64_t n) {
    int64_t next = 0;
    for (const Segment& s : segments) {
      if (s.offset != next) return false;
      next += s.length;
    }
    return next == n;
  }

  void fill(const at::Tensor& statistics) {
    py::gil_scoped_acquire gil;
    try {
      fill_statistics_(statistics);
    } catch (py::error_already_set& error) {
      throw std::runtime_error(error.what());
    }
  }

  c10::intrusive_ptr<c10::ivalue::Future> all_reduce(at::Tensor tensor) {
    std::vector<at::Tensor> tensors{std::move(tensor)};
    c10d::AllreduceOptions options;
    options.reduceOp = c10d::ReduceOp::SUM;
    return group_->allreduce(tensors, options)->getFuture();
  }

  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  int64_t world_;
  at::Tensor local_sq_, grad_sq_;
  bool measure_local_;
  int64_t vector_size_;
  py::function fill_statistics_;
  std::unordered_map<const c10::TensorImpl*, int64_t> index_;
  c10::intrusive_ptr<c10::ivalue::Future> pending_;
};

namespace {

class StatisticsCommHook : public c10d::CommHookInterface {
 public:
  explicit StatisticsCommHook(std::shared_ptr<HookState> state) : state_(std::move(state)) {}

  c10::intrusive_ptr<c10::ivalue::Future> runHook(c10d::GradBucket& bucket) override { return state_->run(bucket); }

  at::Tensor parseHookResult(const c10::IValue& result) override {
    return c10d::detail::parseCppCommHookResult(result);
  }

 private:
  std::shared_ptr<HookState> state_;
};

}  // namespace

std::shared_ptr<HookState> register_statistics_hook(const py::object& reducer,
                                                    c10::intrusive_ptr<c10d::ProcessGroup> group,
                                                    const std::vector<at::Tensor>& params, at::Tensor local_sq,
                                                    at::Tensor grad_sq, bool measure_local, int64_t vector_size,
                                                    py::function fill_statistics) {
  auto state = std::make_shared<HookState>(std::move(group), params, std::move(local_sq), std::move(grad_sq),
                                           measure_local, vector_size, std::move(fill_statistics));
  reducer.cast<c10d::Reducer&>().register_comm_hook(std::make_unique<StatisticsCommHook>(state));
  return state;
}

void bind_ddp_hook(py::module& m) {
  py::class_<HookState, std::shared_ptr<HookState>>(m, "HookState")
      .def("wait", &HookState::wait)
      .def_readwrite("active", &HookState::active_);
  m.def("register_statistics_hook", &register_statistics_hook, py::arg("reducer"), py::arg("group"),
        py::arg("params"), py::arg("local_sq"), py::arg("grad_sq"), py::arg("measure_local"),
        py::arg("vector_size"), py::arg("fill_statistics"));
}

}  // namespace largebatch
