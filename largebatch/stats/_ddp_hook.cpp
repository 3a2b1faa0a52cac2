// DDP's default reduction (the mean over workers) with the gradient statistics
// taken in the same passes, as a C++ communication hook.
//
// The Python hook of ddp.py does the same work in three passes over each
// bucket (the local norms, the division by the world size, and later
// ||p.grad||^2) and pays for a Python call per bucket: 10-13% of a small
// MLP's step under 2-process gloo DDP, against 3-4% for this hook
// (benchmarks/grad_stats_ddp.py, per-worker statistics). Here:
//   * sample="worker": before the all-reduce, one pass per parameter reads
//     its local gradient, adds up its squares (the per-worker statistic) and
//     writes it divided by the world size; after it, the future's callback
//     reads the squared norms of the averaged gradients (B = ||p.grad||^2)
//     while the bucket is in cache, so DDP's end-of-backward wait covers it;
//   * sample="micro_batch" (its norms come from the accumulation hook,
//     _accumulate.cpp): the local sums are all-reduced as they are, and the
//     callback divides them by the world size and takes B in one pass (the
//     last bucket, copied anyway to carry the statistics, is divided in
//     that copy, its callback only reads B);
//   * the step's statistics vector rides on the last bucket's all-reduce (one
//     collective per step, as in ddp.py); Python is called once per step, to
//     fill it;
//   * with any comm hook the reducer copies each gradient into its bucket
//     and, after the reduction, the hook's result back into p.grad. Where
//     nothing else can see p.grad (AccumulateGrad's own test for adopting a
//     tensor, and no other tensor on its storage, such as a flat gradient
//     buffer) the callback makes p.grad a view of the result instead, laid
//     out as the reducer's views of it, so that copy finds source and
//     destination the same and returns. The result is then a new tensor of
//     each step, never a buffer the reducer writes again. (A gradient the
//     autograd engine still refers to when a fast reduction's callback runs
//     fails the test and is copied as before.) Not with
//     find_unused_parameters or static_graph (a globally unused parameter
//     keeps its p.grad there) nor gradient_as_bucket_view (p.grad is the
//     bucket).
// Formulas: stats.md, "Per-worker statistics under DDP". Loaded by _native.py.

#include <torch/extension.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/utils/pybind.h>

#include "_kernels.h"

#include <atomic>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

namespace largebatch {
namespace {

// One parameter's gradient inside a bucket.
struct Segment {
  int64_t slot;    // index into the statistics vectors (-1: not tracked)
  int64_t offset;  // elements from the start of the bucket's buffer
  int64_t length;
};

// Makes each parameter's p.grad the view of `result` that the reducer will
// copy into it (Reducer::populate_bucket_views_out's layout), where no one
// else refers to p.grad or to its memory. Returns how many were handed over.
int64_t hand_over_grads(const at::Tensor& result, const std::vector<at::Tensor>& params,
                        const std::vector<Segment>& segments) {
  // Under the GIL: Python code cannot take a new reference to p.grad between
  // the test and the assignment.
  py::gil_scoped_acquire gil;
  int64_t handed = 0;
  for (size_t j = 0; j < params.size(); ++j) {
    const at::Tensor& param = params[j];
    at::Tensor& grad = param.mutable_grad();
    if (!grad.defined() || grad.requires_grad() || grad.layout() != at::kStrided ||
        grad.scalar_type() != result.scalar_type() || grad.device() != result.device() ||
        grad.sizes() != param.sizes() || !torch::autograd::impl::is_tensor_stealable(grad, 1) ||
        grad.storage().use_count() != 1) {  // not a view into a buffer someone keeps (or a past result)
      continue;
    }
    const Segment& s = segments[j];
    grad = param.is_non_overlapping_and_dense() ? result.as_strided(param.sizes(), param.strides(), s.offset)
                                                : result.narrow(0, s.offset, s.length).view(param.sizes());
    ++handed;
  }
  return handed;
}

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
            py::function fill_statistics, bool hand_over)
      : hand_over_(hand_over),
        group_(std::move(group)),
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
    const bool tiled = covers(segments, n);
    const bool hand_over = hand_over_ && tiled;

    // What is all-reduced: the bucket, or (last bucket, same dtype) a copy of
    // it followed by the statistics vector.
    at::Tensor sent = buffer, statistics;
    const bool rides = carries && local_sq_.scalar_type() == buffer.scalar_type();
    // The local norms' pass writes its output anyway; handing over, into a
    // new tensor rather than the reducer's buffer.
    const bool fresh = rides || (hand_over && measure_local_);
    if (fresh) sent = at::empty({n + (rides ? vector_size_ : 0)}, buffer.options());
    if (rides) {
      statistics = sent.narrow(0, n, vector_size_);
    } else if (carries) {
      statistics = at::empty({vector_size_}, local_sq_.options());
    }
    // A pass before the all-reduce (the local norms', or the copy that
    // carries the statistics) also divides by the world size, as DDP does.
    // Without one, the sum over workers is divided afterwards, in the pass
    // that reads B: one pass fewer (the same mean for a world size that is a
    // power of two; otherwise it may differ from DDP's in the last bit).
    const bool divide_after = !measure_local_ && !rides && tiled;
    const double before = divide_after ? 1.0 : inv_world;
    at::Tensor sent_part = sent.narrow(0, 0, n);  // the bucket as all-reduced
    if (measure_local_ && tiled) {
      segment_sq_norms(buffer, segments, local_sq_, &sent_part, before);
    } else {
      if (measure_local_) segment_sq_norms(buffer, segments, local_sq_, nullptr, 1.0);
      if (before != 1.0) {
        at::mul_out(sent_part, buffer, before);
      } else if (fresh) {
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
    std::vector<at::Tensor> params = hand_over ? bucket.getParameters() : std::vector<at::Tensor>();
    // Divided afterwards, the bucket was reduced in the reducer's buffer,
    // which is written again next step: handed over, the mean goes to a new
    // tensor.
    const bool copy_out = hand_over && divide_after;
    return reduced->then(
        [n, divide_after, copy_out, inv_world, segments = std::move(segments), grad_sq, params = std::move(params),
         handed_over = handed_over_](c10::ivalue::Future& future) {
          at::Tensor averaged = future.value().toTensorVector()[0].narrow(0, 0, n);
          at::Tensor result = copy_out ? at::empty({n}, averaged.options()) : averaged;
          if (divide_after) {  // the mean and B in one pass
            segment_sq_norms(averaged, segments, grad_sq, &result, inv_world, /*square_output=*/true);
          } else {  // B, while the bucket is in cache
            segment_sq_norms(averaged, segments, grad_sq, nullptr, 1.0);
          }
          if (!params.empty()) *handed_over += hand_over_grads(result, params, segments);
          return c10::IValue(result);
        },
        c10::TensorType::get());
  }

  // Waits for the step's statistics all-reduce (the GIL released meanwhile;
  // usually it is done, DDP having waited for the last bucket).
  void wait() {
    if (!pending_) return;
    c10::intrusive_ptr<c10::ivalue::Future> pending = std::exchange(pending_, {});
    if (pending->completed() && !pending->hasError()) return;
    py::gil_scoped_release no_gil;
    pending->wait();
  }

  // summary()'s tensors, new ones: A = (the reduced sample sums) / a_divisor,
  // B = grad_sq / b_divisor and the number of examples (the vector's last
  // entry), after waiting for the statistics' all-reduce. One call rather
  // than half a dozen small tensor operations, each of which costs tens of
  // microseconds right after a backward (its code evicted from the caches).
  std::tuple<at::Tensor, at::Tensor, at::Tensor> summarize(const at::Tensor& reduced, double a_divisor,
                                                           double b_divisor) {
    wait();
    const int64_t K = grad_sq_.numel();
    TORCH_CHECK(reduced.dim() == 1 && reduced.numel() > K && reduced.is_contiguous() &&
                    reduced.scalar_type() == grad_sq_.scalar_type() && reduced.device().is_cpu(),
                "summarize: the reduced statistics vector of this hook");
    at::Tensor A = at::empty({K}, grad_sq_.options()), B = at::empty({K}, grad_sq_.options());
    at::Tensor examples = at::empty({}, grad_sq_.options());
    AT_DISPATCH_FLOATING_TYPES(grad_sq_.scalar_type(), "largebatch_summarize", [&] {
      const scalar_t* sums = reduced.const_data_ptr<scalar_t>();
      const scalar_t* grad_sq = grad_sq_.const_data_ptr<scalar_t>();
      scalar_t* a = A.data_ptr<scalar_t>();
      scalar_t* b = B.data_ptr<scalar_t>();
      const auto a_div = static_cast<scalar_t>(a_divisor), b_div = static_cast<scalar_t>(b_divisor);
      for (int64_t k = 0; k < K; ++k) {
        a[k] = sums[k] / a_div;
        b[k] = grad_sq[k] / b_div;
      }
      *examples.data_ptr<scalar_t>() = sums[reduced.numel() - 1];
    });
    return {A, B, examples};
  }

  bool active_ = true;
  bool hand_over_;                        // hand the reduced buckets over as p.grad (see the top)
  // gradients handed over (tests check the path is taken); shared with callbacks that may outlive this
  std::shared_ptr<std::atomic<int64_t>> handed_over_ = std::make_shared<std::atomic<int64_t>>(0);

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

  void fill(at::Tensor& statistics) {
    py::gil_scoped_acquire gil;
    try {
      // (the vector, the number of examples for its last entry or None), or None
      py::object filled = fill_statistics_(statistics);
      if (filled.is_none()) return;
      auto parts = filled.cast<py::tuple>();
      statistics.copy_(parts[0].cast<at::Tensor>());
      if (!parts[1].is_none()) store_slot(statistics, statistics.numel() - 1, parts[1].cast<double>());
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
                                                    py::function fill_statistics, bool hand_over) {
  auto state = std::make_shared<HookState>(std::move(group), params, std::move(local_sq), std::move(grad_sq),
                                           measure_local, vector_size, std::move(fill_statistics), hand_over);
  reducer.cast<c10d::Reducer&>().register_comm_hook(std::make_unique<StatisticsCommHook>(state));
  return state;
}

void bind_ddp_hook(py::module& m) {
  py::class_<HookState, std::shared_ptr<HookState>>(m, "HookState")
      .def("wait", &HookState::wait)
      .def("summarize", &HookState::summarize, py::arg("reduced"), py::arg("a_divisor"), py::arg("b_divisor"))
      .def_readwrite("active", &HookState::active_)
      .def_readwrite("hand_over", &HookState::hand_over_)
      .def_property_readonly("handed_over", [](const HookState& state) { return state.handed_over_->load(); });
  m.def("register_statistics_hook", &register_statistics_hook, py::arg("reducer"), py::arg("group"),
        py::arg("params"), py::arg("local_sq"), py::arg("grad_sq"), py::arg("measure_local"),
        py::arg("vector_size"), py::arg("fill_statistics"), py::arg("hand_over"));
}

}  // namespace largebatch
