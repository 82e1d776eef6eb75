// trajops from a libtorch host: load the operator library, call three ops through c10::Dispatcher,
// and differentiate them with libtorch autograd.
//
// Usage: trajops_example /path/to/trajops/_C.abi3.so
//
// The autograd formulas of trajops are registered from Python (torch.library.register_autograd),
// so a C++ host gets none from the shared object. Every differentiable op has its backward as an
// op of its own (trajops::<op>_backward), and the glue below is one torch::autograd::Function per
// op that calls forward and backward with the same arguments as trajops/ops/<op>.py does.
//
// Output (stdout), one tensor per line, read by tests/test_cpp_example.py, which recomputes every
// value with the Python API:  <name> <d0,d1,...> <v0> <v1> ...  (fp64, 17 significant digits, so
// the inputs printed here are exactly the inputs used). Scalar settings are printed as 0-d tensors.
#include <dlfcn.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <cstdio>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

// ---------------------------------------------------------------- ops, looked up by schema name
// typed<...>() checks the C++ signature against the registered schema and throws on a mismatch:
// int -> int64_t, float -> double, Tensor? -> optional<Tensor>, Tensor[] -> TensorList in and
// std::vector<Tensor> out, float? -> optional<double>.
// A host would keep the handles; looking one up per call is a locked hash-map lookup, fine here.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The last optional of flow and STP is cu_seqlens (packed sequences); this example runs padded
// batches (nullopt).
using FlowFn = Tensor(const Tensor&, int64_t, double, const std::optional<Tensor>&);
using FlowBackwardFn = Tensor(const Tensor&, const Tensor&, int64_t, double, const std::optional<Tensor>&,
                              const std::optional<Tensor>&);
using StpFn = std::tuple<Tensor, Tensor>(at::TensorList, const Tensor&, const std::optional<Tensor>&,
                                         const std::optional<Tensor>&);
using StpBackwardFn = std::vector<Tensor>(const Tensor&, const Tensor&, at::TensorList, const Tensor&,
                                          const std::optional<Tensor>&, const std::optional<Tensor>&);
using AttnFn = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                          const std::optional<Tensor>&, bool, std::optional<double>);
using AttnBackwardFn = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const std::optional<Tensor>&, bool, std::optional<double>, const Tensor&, const Tensor&);

// ---------------------------------------------------------------- autograd glue, one Function per op
// backward() returns one gradient per argument of forward() (a TensorList counts one per tensor);
// non-differentiable arguments get an undefined Tensor.

struct TrajectoryFlow : torch::autograd::Function<TrajectoryFlow> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, int64_t window, double eps) {
    ctx->save_for_backward({x});  // the backward recomputes the step norms from x
    ctx->saved_data["window"] = window;
    ctx->saved_data["eps"] = eps;
    return op<FlowFn>("trajops::trajectory_flow").call(x, window, eps, std::nullopt);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor x = ctx->get_saved_variables()[0];
    const Tensor dx = op<FlowBackwardFn>("trajops::trajectory_flow_backward")
                          .call(grads[0], x, ctx->saved_data["window"].toInt(), ctx->saved_data["eps"].toDouble(),
                                std::nullopt, std::nullopt);  // no cu_seqlens, no stats (CPU recomputes)
    return {dx, Tensor(), Tensor()};
  }
};

struct StpLoss : torch::autograd::Function<StpLoss> {
  // Returns {losses (L, S, B), stats (L, S, B, 3)}; stats (norms and cosines) feed the backward.
  static variable_list forward(AutogradContext* ctx, at::TensorList hidden, const Tensor& triples,
                               const std::optional<Tensor>& lengths) {
    auto [losses, stats] = op<StpFn>("trajops::stp_loss").call(hidden, triples, lengths, std::nullopt);
    ctx->mark_non_differentiable({stats});
    variable_list saved{stats, triples, lengths.value_or(Tensor())};
    saved.insert(saved.end(), hidden.begin(), hidden.end());
    ctx->save_for_backward(saved);
    return {losses, stats};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<Tensor> hidden(saved.begin() + 3, saved.end());
    std::optional<Tensor> lengths;
    if (saved[2].defined()) lengths = saved[2];
    variable_list out = op<StpBackwardFn>("trajops::stp_loss_backward")
                            .call(grads[0].contiguous(), saved[0], hidden, saved[1], lengths, std::nullopt);
    out.emplace_back();  // triples
    out.emplace_back();  // lengths
    return out;
  }
};

struct TemperatureAttention : torch::autograd::Function<TemperatureAttention> {
  // Returns {out (B, Hq, Tq, Dv), lse (B, Hq, Tq)}; both are differentiable.
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& tau, const std::optional<Tensor>& attn_mask, bool causal,
                               std::optional<double> scale) {
    auto [out, lse] = op<AttnFn>("trajops::temperature_attention").call(q, k, v, tau, attn_mask, causal, scale);
    // The backward needs out and lse (the flash-style recomputation), as in the Python formula.
    ctx->save_for_backward({q, k, v, tau, attn_mask.value_or(Tensor()), out, lse});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    // An unused output (often lse) then arrives as an undefined gradient, not a tensor of zeros.
    ctx->set_materialize_grads(false);
    return {out, lse};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(s[5]);
    std::optional<Tensor> grad_lse, mask;
    if (grads[1].defined()) grad_lse = grads[1];
    if (s[4].defined()) mask = s[4];
    const c10::IValue scale = ctx->saved_data["scale"];
    auto [dq, dk, dv, dtau] = op<AttnBackwardFn>("trajops::temperature_attention_backward")
                                  .call(grad_out, grad_lse, s[0], s[1], s[2], s[3], mask,
                                        ctx->saved_data["causal"].toBool(),
                                        scale.isNone() ? std::nullopt : std::optional<double>(scale.toDouble()),
                                        s[5], s[6]);
    return {dq, dk, dv, dtau, Tensor(), Tensor(), Tensor()};
  }
};

// ---------------------------------------------------------------- deterministic inputs and printing
const auto kF64 = at::TensorOptions().dtype(at::kDouble);

// A smooth, non-periodic-looking fill: sin(a * i + b) over the flat index i.
Tensor wave(at::IntArrayRef shape, double a, double b) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return at::arange(n, kF64).mul(a).add(b).sin().reshape(shape);
}

void print(const std::string& name, const Tensor& t) {
  const Tensor flat = t.detach().to(at::kDouble).contiguous().reshape({-1});
  std::string dims;
  for (int64_t i = 0; i < t.dim(); ++i) dims += (i ? "," : "") + std::to_string(t.size(i));
  std::printf("%s %s", name.c_str(), dims.empty() ? "-" : dims.c_str());
  const double* p = flat.data_ptr<double>();
  for (int64_t i = 0; i < flat.numel(); ++i) std::printf(" %.17g", p[i]);
  std::printf("\n");
}

void print_scalar(const std::string& name, double v) { print(name, at::scalar_tensor(v, kF64)); }

// ---------------------------------------------------------------- the three ops, forward and backward
void run_trajectory_flow() {
  const int64_t window = 3;
  const double eps = 1e-6;
  const Tensor x = wave({2, 7, 5}, 0.37, 0.1).requires_grad_();
  const Tensor w = wave({2, 7, 5}, 0.71, -0.4);  // weights of the scalar objective
  const Tensor out = TrajectoryFlow::apply(x, window, eps);
  (out * w).sum().backward();
  print_scalar("flow.window", static_cast<double>(window));
  print_scalar("flow.eps", eps);
  print("flow.x", x);
  print("flow.w", w);
  print("flow.out", out);
  print("flow.grad_x", x.grad());
}

void run_stp_loss() {
  // L = 2 layers of (B=2, T=6, D=4), S = 3 spans; row 1 has length 5, so its triples stay below 5.
  const Tensor h0 = wave({2, 6, 4}, 0.53, 0.2).requires_grad_();
  const Tensor h1 = wave({2, 6, 4}, 0.29, 1.3).requires_grad_();
  const Tensor triples = at::tensor({0, 2, 5, 1, 2, 4, 1, 3, 4, 0, 1, 3, 2, 3, 5, 0, 2, 4}, at::kLong)
                             .reshape({3, 2, 3});
  const Tensor lengths = at::tensor({6, 5}, at::kLong);
  // Pass the layers as a TensorList (not a std::vector): that is the type autograd unpacks into
  // one differentiable input per tensor; a vector would count as one non-differentiable argument.
  const std::vector<Tensor> layers{h0, h1};
  const variable_list res = StpLoss::apply(at::TensorList(layers), triples, std::optional<Tensor>(lengths));
  const Tensor w = wave({2, 3, 2}, 0.61, 0.5);
  (res[0] * w).sum().backward();
  print("stp.h0", h0);
  print("stp.h1", h1);
  print("stp.triples", triples);
  print("stp.lengths", lengths);
  print("stp.w", w);
  print("stp.losses", res[0]);
  print("stp.grad_h0", h0.grad());
  print("stp.grad_h1", h1.grad());
}

void run_temperature_attention() {
  // Grouped-query attention (Hq = 4, Hkv = 2), causal, a per-head tau of shape (Hq, 1).
  const Tensor q = wave({2, 4, 5, 3}, 0.43, 0.3).requires_grad_();
  const Tensor k = wave({2, 2, 5, 3}, 0.47, -0.2).requires_grad_();
  const Tensor v = wave({2, 2, 5, 2}, 0.59, 0.7).requires_grad_();
  const Tensor tau = at::tensor({0.5, 0.8, 1.3, 2.0}, kF64).reshape({4, 1}).requires_grad_();
  const Tensor w_out = wave({2, 4, 5, 2}, 0.83, 0.1);
  const Tensor w_lse = wave({2, 4, 5}, 0.31, -0.6);
  print("attn.q", q);
  print("attn.k", k);
  print("attn.v", v);
  print("attn.tau", tau);
  print("attn.w_out", w_out);
  print("attn.w_lse", w_lse);

  // 1) an objective of out and lse: the backward op receives both gradients.
  variable_list res = TemperatureAttention::apply(q, k, v, tau, std::nullopt, true, std::nullopt);
  ((res[0] * w_out).sum() + (res[1] * w_lse).sum()).backward();
  print("attn.out", res[0]);
  print("attn.lse", res[1]);
  for (const auto& [name, t] : {std::pair{"q", q}, {"k", k}, {"v", v}, {"tau", tau}}) {
    print(std::string("attn.grad_") + name, t.grad());
    t.mutable_grad().reset();
  }

  // 2) an objective of out only (lse's gradient is undefined: the op gets grad_lse = None), with a
  //    key-padding mask (B, 1, 1, Tk) that hides key 1 from batch 1, so the mask is saved too.
  const Tensor mask = at::arange(5, at::kLong).ne(1).logical_or(at::arange(2, at::kLong).eq(0).reshape({2, 1}))
                          .reshape({2, 1, 1, 5});
  res = TemperatureAttention::apply(q, k, v, tau, std::optional<Tensor>(mask), true, std::nullopt);
  (res[0] * w_out).sum().backward();
  print("attn_masked.mask", mask);
  print("attn_masked.out", res[0]);
  print("attn_masked.lse", res[1]);
  for (const auto& [name, t] : {std::pair{"q", q}, {"k", k}, {"v", v}, {"tau", tau}}) {
    print(std::string("attn_masked.grad_") + name, t.grad());
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s /path/to/trajops/_C.abi3.so\n", argv[0]);
    return 2;
  }
  // Loading the library runs its static initializers, which register the schemas
  // (TORCH_LIBRARY) and the CPU kernels (TORCH_LIBRARY_IMPL) with this process's dispatcher.
  // No libpython is needed: the library's one Python symbol (PyModule_Create2, used only by the
  // PyInit__C that Python calls on `import trajops._C`) is weak, so even RTLD_NOW loads it.
  if (dlopen(argv[1], RTLD_LAZY | RTLD_LOCAL) == nullptr) {
    std::fprintf(stderr, "trajops_example: cannot load %s: %s\n", argv[1], dlerror());
    return 1;
  }
  try {
    // The schema strings this host sees: the ones in csrc/trajops.cpp (and trajops.SCHEMAS).
    for (const char* name : {"trajops::trajectory_flow", "trajops::trajectory_flow_backward", "trajops::stp_loss",
                             "trajops::stp_loss_backward", "trajops::temperature_attention",
                             "trajops::temperature_attention_backward"}) {
      const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
      std::printf("schema %s\n", c10::toString(handle.schema()).c_str());
    }
    run_trajectory_flow();
    run_stp_loss();
    run_temperature_attention();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "trajops_example: %s\n", e.what());
    return 1;
  }
  return 0;
}
