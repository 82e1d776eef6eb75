// trajops._C: the op schemas (the single C++ definition of every op's signature) and a Python
// module stub so that `import trajops._C` loads this library and runs its registrations.
// trajops/_library.py holds the same schema strings for builds without this extension; a test
// checks that both agree.
#include <Python.h>
#include <torch/library.h>

// The one Python symbol this library uses is weak, so that a non-Python host (a C++ or Rust
// program on libtorch) can load it with eager binding (RTLD_NOW, LD_BIND_NOW): it then resolves
// to null, and only PyInit__C, which such a host never calls, would use it.
#pragma weak PyModule_Create2

extern "C" {
// No Python API is exposed: the ops are reached through torch.ops.trajops.*.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(trajops, m) {
  m.def("trajectory_flow(Tensor x, int window=8, float eps=1e-06, Tensor? cu_seqlens=None) -> Tensor");
  // The forward that also returns its per-row stats (2, B, T) for the backward (no CPU kernel: the
  // reference serves CPU; CPU callers use trajectory_flow).
  m.def(
      "trajectory_flow_with_stats(Tensor x, int window=8, float eps=1e-06, Tensor? cu_seqlens=None) -> "
      "(Tensor, Tensor)");
  m.def(
      "trajectory_flow_backward(Tensor grad_out, Tensor x, int window, float eps, "
      "Tensor? cu_seqlens=None, Tensor? stats=None) -> Tensor");
  m.def(
      "stp_loss(Tensor[] hidden, Tensor triples, Tensor? lengths=None, Tensor? cu_seqlens=None) -> "
      "(Tensor, Tensor)");
  m.def(
      "stp_loss_backward(Tensor grad_loss, Tensor stats, Tensor[] hidden, Tensor triples, "
      "Tensor? lengths, Tensor? cu_seqlens=None) -> Tensor[]");
  m.def("stp_loss_dense(Tensor[] hidden, Tensor? lengths=None, Tensor? cu_seqlens=None) -> (Tensor, Tensor)");
  m.def(
      "stp_loss_dense_backward(Tensor grad_loss, Tensor stats, Tensor[] hidden, "
      "Tensor? lengths, Tensor? cu_seqlens=None) -> Tensor[]");
  m.def(
      "kv_relevance(Tensor traj_pool, Tensor ts_pool, Tensor live_pool, Tensor page_table, Tensor query, "
      "Tensor now, float alpha, float decay) -> Tensor");
  m.def(
      "kv_topk(Tensor traj_pool, Tensor ts_pool, Tensor live_pool, Tensor page_table, Tensor query, Tensor now, "
      "float alpha, float decay, int k) -> (Tensor, Tensor)");
  m.def(
      "kv_evict_append_(Tensor(a!) traj_pool, Tensor(b!) ts_pool, Tensor(c!) live_pool, Tensor(d!) pinned_pool, "
      "Tensor(e!) page_table, Tensor(f!) live_count, Tensor capacity, Tensor(g!) free_pages, Tensor(h!) free_top, "
      "Tensor(i!) evicted_total, Tensor now, Tensor new_traj, Tensor lengths, Tensor? pin, float alpha, "
      "float decay, Tensor(j!)? pos_pool=None, Tensor(k!)? next_position=None) -> (Tensor, Tensor, Tensor)");
  m.def("kv_write_(Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor written, Tensor k, Tensor v) -> ()");
  m.def(
      "paged_temperature_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor page_table, Tensor live_pool, "
      "Tensor tau, Tensor? slots=None, float? scale=None, Tensor? k_new=None, Tensor? v_new=None) -> (Tensor, Tensor)");
  m.def(
      "adaptive_positional_encoding(Tensor displacement, Tensor pe_table, Tensor? positions=None) -> Tensor");
  m.def(
      "adaptive_positional_encoding_backward(Tensor grad_out, Tensor displacement, Tensor pe_table, "
      "Tensor? positions, bool need_table) -> (Tensor, Tensor, Tensor)");
  m.def(
      "temperature_attention(Tensor q, Tensor k, Tensor v, Tensor tau, Tensor? attn_mask=None, "
      "bool causal=False, float? scale=None) -> (Tensor, Tensor)");
  m.def(
      "temperature_attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, "
      "Tensor tau, Tensor? attn_mask, bool causal, float? scale, Tensor out, Tensor lse) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "temperature_attention_varlen(Tensor q, Tensor k, Tensor v, Tensor tau, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, float? scale) -> (Tensor, Tensor)");
  m.def(
      "temperature_attention_varlen_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, "
      "Tensor tau, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, "
      "float? scale, Tensor out, Tensor lse) -> (Tensor, Tensor, Tensor, Tensor)");
}
