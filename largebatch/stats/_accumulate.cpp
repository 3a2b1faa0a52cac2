// Per-micro-batch squared norms taken inside gradient accumulation.
//
// sample="micro_batch" needs ||h_i||^2 for each micro-batch's gradient h_i
// (stats.md, "Per-micro-batch statistics"). A tensor hook that reads h_i
// costs a pass over every gradient per micro-batch, and B = ||p.grad||^2 one
// more per step: 5% of a 4-micro-batch MLP step on a 2-core CPU
// (benchmarks/grad_stats_ddp.py). But accumulation already reads h_i once:
// from the second micro-batch on, AccumulateGrad adds it into p.grad. This
// hook, a pre-hook on each parameter's AccumulateGrad node (it runs after
// every tensor hook, so it sees the gradient that will be accumulated),
// does that add itself and takes ||h_i||^2 and ||p.grad + h_i||^2 in the
// same pass, then hands the accumulated tensor back to AccumulateGrad, which
// finds p.grad empty and adopts it as is (its "steal" case). p.grad keeps
// its storage, values (the same IEEE sums as the in-place add) and layout.
// The first micro-batch, whose gradient AccumulateGrad adopts, is read once.
//
// The add is done here only where it is exactly AccumulateGrad's in-place
// add and the adoption is certain: no grad mode (create_graph), plain dense
// CPU float32/float64 tensors of the same strides, no other reference to
// p.grad (DDP's gradient_as_bucket_view, a kept reference), no node pre-hook
// after this one. Elsewhere the hook reads h_i and lets AccumulateGrad add
// it. One backward at a time per parameter (AccumulateGrad's lock is not
// held here).
//
// The norms of p.grad are remembered with the tensor they describe (its
// TensorImpl, held weakly, its data pointer and version counter), so B is
// reused only while p.grad is the tensor whose norm was taken, unchanged.
// Loaded by _native.py; used by engine.py.

#include <ATen/MemoryOverlap.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/utils/grad_layout_contract.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/extension.h>

#include <memory>
#include <utility>
#include <vector>

#include "_kernels.h"

namespace largebatch {

using torch::autograd::AccumulateGrad;
using torch::autograd::variable_list;

namespace {

bool plain_dense_cpu(const at::Tensor& t) {
  return t.device().is_cpu() && t.layout() == at::kStrided && !at::isTensorSubclassLike(t) &&
         (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble) && t.is_non_overlapping_and_dense();
}

// ||t||^2 in double. A dense tensor's elements fill its span, in some order.
double sq_norm(const at::Tensor& t) {
  if (!plain_dense_cpu(t)) {
    return at::linalg_vector_norm(t.detach(), 2, c10::nullopt, false, at::kDouble).square().item<double>();
  }
  return AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "largebatch_sq_norm", [&] {
    auto* x = const_cast<scalar_t*>(t.const_data_ptr<scalar_t>());  // only read
    return over_chunks<double>(t.numel(), [x](int64_t begin, int64_t n) {
      return sum_of_squares<scalar_t, Write::kNothing>(x + begin, nullptr, n, scalar_t(1));
    });
  });
}

}  // namespace

class AccumulationState {
 public:
  AccumulationState(at::Tensor local_sq, at::Tensor grad_sq, std::vector<bool> eligible)
      : local_sq_(std::move(local_sq)), grad_sq_(std::move(grad_sq)), eligible_(std::move(eligible)),
        records_(eligible_.size()) {
    TORCH_CHECK(local_sq_.is_contiguous() && grad_sq_.is_contiguous() &&
                    local_sq_.scalar_type() == grad_sq_.scalar_type() &&
                    local_sq_.numel() == static_cast<int64_t>(eligible_.size()) &&
                    grad_sq_.numel() == local_sq_.numel(),
                "local_sq and grad_sq: contiguous vectors of one dtype, one entry per parameter");
  }

  // Called at the start of each backward (the first parameter gradient):
  // puts the hook on the live AccumulateGrad node of each eligible parameter
  // (nodes live as long as a graph or DDP's reducer holds them) and returns
  // which parameters it will measure in this backward. The others (not
  // eligible, no node yet, as under reentrant checkpointing, or a node this
  // backward does not run, as for torch.autograd.grad's inputs) are left to
  // the engine's Python tensor hook.
  std::vector<bool> begin_backward(const std::vector<at::Tensor>& params, const std::shared_ptr<AccumulationState>& self);

  // `may_add`: no node pre-hook runs after this one (one that would replace
  // the gradient AccumulateGrad adds must see the micro-batch's, not the sum).
  variable_list on_gradient(int64_t k, AccumulateGrad& node, const variable_list& grads, bool may_add);

  // Whether grad_sq holds ||p.grad||^2 of every parameter now (p.grad
  // unchanged since its norm was taken, or None).
  bool applied_sq_norms(const std::vector<at::Tensor>& params);

  void remove(const std::vector<at::Tensor>& params);

  bool active_ = true;
  int64_t fused_ = 0;  // accumulations done here (tests check the path is taken)

 private:
  // What p.grad's norm in grad_sq_ was taken of.
  struct Record {
    bool fresh = false;  // taken in a hook: p.grad should be the tensor at `data`, at `version`
    bool sealed = false; // checked against p.grad once; `impl` is that tensor
    c10::weak_intrusive_ptr<c10::TensorImpl> impl{c10::intrusive_ptr<c10::TensorImpl>()};
    const void* data = nullptr;
    uint32_t version = 0;
  };

  void note(int64_t k, const at::Tensor& becomes_grad, double grad_sq) {
    Record& r = records_[static_cast<size_t>(k)];
    r.fresh = true;
    r.sealed = false;
    r.data = becomes_grad.const_data_ptr();
    r.version = becomes_grad.unsafeGetTensorImpl()->version_counter().current_version();
    store_slot(grad_sq_, k, grad_sq);
  }

  static bool fusable(const at::Tensor& grad, const at::Tensor& incoming, const at::Tensor& variable);

  at::Tensor local_sq_, grad_sq_;
  std::vector<bool> eligible_;
  std::vector<Record> records_;
};

namespace {

class AccumulationHook : public torch::autograd::FunctionPreHook {
 public:
  AccumulationHook(std::weak_ptr<AccumulationState> state, const AccumulationState* owner, int64_t k,
                   AccumulateGrad* node)
      : state_(std::move(state)), owner_(owner), k_(k), node_(node) {}

  variable_list operator()(const variable_list& grads) override {
    std::shared_ptr<AccumulationState> state = state_.lock();
    if (!state || !state->active_) return grads;
    const bool last = node_->pre_hooks().back().get() == this;  // node_ owns this hook, so it is alive
    return state->on_gradient(k_, *node_, grads, last);
  }

  const AccumulationState* owner() const { return owner_; }

 private:
  std::weak_ptr<AccumulationState> state_;  // weak: the node must not keep the engine's state alive
  const AccumulationState* owner_;          // identity only, valid or not
  int64_t k_;
  AccumulateGrad* node_;
};

bool has_hook(torch::autograd::Node& node, const AccumulationState* owner) {
  for (const auto& hook : node.pre_hooks()) {
    auto* ours = dynamic_cast<const AccumulationHook*>(hook.get());
    if (ours != nullptr && ours->owner() == owner) return true;
  }
  return false;
}

}  // namespace

std::vector<bool> AccumulationState::begin_backward(const std::vector<at::Tensor>& params,
                                                    const std::shared_ptr<AccumulationState>& self) {
  TORCH_CHECK(params.size() == eligible_.size(), "begin_backward: one tensor per tracked parameter");
  const auto* exec_info = torch::autograd::get_current_graph_task_exec_info();
  const bool runs_every_node = exec_info == nullptr || exec_info->empty();  // backward() without inputs=
  std::vector<bool> measured(params.size(), false);
  for (size_t k = 0; k < params.size(); ++k) {
    if (!eligible_[k]) continue;
    c10::intrusive_ptr<torch::autograd::Node> node = torch::autograd::impl::try_get_grad_accumulator(params[k]);
    auto* accumulator = dynamic_cast<AccumulateGrad*>(node.get());
    if (accumulator == nullptr) continue;
    if (!runs_every_node) {
      auto it = exec_info->find(accumulator);
      // needed_: the node runs (a captured-only input of autograd.grad does not)
      if (it == exec_info->end() || !it->second.needed_) continue;
    }
    if (!has_hook(*accumulator, this)) {
      accumulator->add_pre_hook(std::make_unique<AccumulationHook>(self, this, static_cast<int64_t>(k), accumulator));
    }
    measured[k] = true;
  }
  return measured;
}

bool AccumulationState::fusable(const at::Tensor& grad, const at::Tensor& incoming, const at::Tensor& variable) {
  return !at::GradMode::is_enabled() && plain_dense_cpu(grad) && plain_dense_cpu(incoming) &&
         grad.scalar_type() == incoming.scalar_type() && grad.sizes() == incoming.sizes() &&
         grad.strides() == incoming.strides() && !grad.requires_grad() &&
         at::get_overlap_status(grad, incoming) == at::MemOverlapStatus::No &&
         torch::autograd::utils::obeys_layout_contract(grad, variable) &&
         // only p.grad refers to it (a Python wrapper nobody else holds is allowed):
         // AccumulateGrad will adopt it rather than copy it
         torch::autograd::impl::is_tensor_stealable(grad, 1);
}

variable_list AccumulationState::on_gradient(int64_t k, AccumulateGrad& node, const variable_list& grads,
                                             bool may_add) {
  if (grads.empty() || !grads[0].defined()) return grads;
  const at::Tensor& incoming = grads[0];
  at::Tensor& grad = node.variable.mutable_grad();
  if (!grad.defined()) {  // AccumulateGrad adopts `incoming` (or copies it)
    const double sq = sq_norm(incoming);
    store_slot(local_sq_, k, sq, /*add=*/true);
    note(k, incoming, sq);
    return grads;
  }
  if (!may_add || !fusable(grad, incoming, node.variable)) {
    store_slot(local_sq_, k, sq_norm(incoming), /*add=*/true);
    records_[static_cast<size_t>(k)] = Record{};  // AccumulateGrad's sum: its norm is not known here
    return grads;
  }
  const AccumulatedSquares sq = AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "largebatch_accumulate", [&] {
    scalar_t* acc = grad.data_ptr<scalar_t>();
    const scalar_t* g = incoming.const_data_ptr<scalar_t>();
    return over_chunks<AccumulatedSquares>(grad.numel(), [acc, g](int64_t begin, int64_t n) {
      return accumulate(acc + begin, g + begin, n);
    });
  });
  grad.unsafeGetTensorImpl()->bump_version();  // written in place, as by AccumulateGrad's add
  store_slot(local_sq_, k, sq.added, /*add=*/true);
  note(k, grad, sq.updated);
  ++fused_;
  // Empty p.grad and pass the sum on: AccumulateGrad adopts it as p.grad.
  at::Tensor accumulated = std::move(grad);
  grad = at::Tensor();
  return {std::move(accumulated)};
}

bool AccumulationState::applied_sq_norms(const std::vector<at::Tensor>& params) {
  TORCH_CHECK(params.size() == records_.size(), "applied_sq_norms: one tensor per tracked parameter");
  bool all = true;
  for (size_t k = 0; k < params.size(); ++k) {
    const at::Tensor& grad = params[k].grad();
    Record& r = records_[k];
    if (!grad.defined()) {
      store_slot(grad_sq_, static_cast<int64_t>(k), 0.0);
      continue;
    }
    const bool same_contents =
        r.data == grad.const_data_ptr() && r.version == grad.unsafeGetTensorImpl()->version_counter().current_version();
    if (r.fresh && same_contents) {  // the hook's tensor was adopted as p.grad: remember which one
      r = Record{false, true, c10::weak_intrusive_ptr<c10::TensorImpl>(grad.getIntrusivePtr()), r.data, r.version};
      continue;
    }
    if (r.sealed && same_contents && r.impl.lock().get() == grad.unsafeGetTensorImpl()) continue;
    r = Record{};
    all = false;
  }
  return all;
}

void AccumulationState::remove(const std::vector<at::Tensor>& params) {
  active_ = false;
  for (const at::Tensor& p : params) {
    c10::intrusive_ptr<torch::autograd::Node> node = torch::autograd::impl::try_get_grad_accumulator(p);
    if (!node) continue;
    auto& hooks = node->pre_hooks();
    for (auto it = hooks.begin(); it != hooks.end();) {
      auto* ours = dynamic_cast<const AccumulationHook*>(it->get());
      it = ours != nullptr && ours->owner() == this ? hooks.erase(it) : std::next(it);
    }
  }
}

void bind_accumulation(py::module& m) {
  py::class_<AccumulationState, std::shared_ptr<AccumulationState>>(m, "AccumulationState")
      .def(py::init<at::Tensor, at::Tensor, std::vector<bool>>(), py::arg("local_sq"), py::arg("grad_sq"),
           py::arg("eligible"))
      .def("begin_backward",
           [](const std::shared_ptr<AccumulationState>& self, const std::vector<at::Tensor>& params) {
             return self->begin_backward(params, self);
           })
      .def("applied_sq_norms", &AccumulationState::applied_sq_norms)
      .def("remove", &AccumulationState::remove)
      .def_readwrite("active", &AccumulationState::active_)
      .def_readonly("fused", &AccumulationState::fused_);
}

}  // namespace largebatch
