"""TrajectoryGuidedOptimizer: momentum SGD whose step size and momentum follow the loss trajectory.

Drop-in for the seed's ``TrajectoryGuidedOptimizer`` (same constructor, ``defaults``,
``param_groups``, per-parameter state key ``momentum_buffer`` and ``step`` signature) with the
update done by multi-tensor ``torch._foreach_*`` kernels, one launch per (group, device, dtype)
and pass instead of one per parameter.

The update (all scalars are Python floats computed on the host from the Python float losses)::

    stability = exp(-var(last 10 recorded losses))   if >= 10 losses are recorded, else 1.0
    momentum  = 0.9 * stability
    lr_g      = group["lr"] * (0.5 + 0.5 * stability)              (per param group)
    buf       = buf * momentum + grad                               (buf starts at zeros)
    p         = p - lr_g * buf

for every parameter whose ``.grad`` is not None. The loss history keeps the last
``trajectory_window`` losses passed as ``step(current_loss=...)``; the window is the one given to
the constructor (``defaults["trajectory_window"]``), as in the seed, not a per-group value.
"""
from __future__ import annotations

import math
import numbers
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["TrajectoryGuidedOptimizer", "trajectory_stability"]

# How many of the most recent losses the stability estimate looks at, and the momentum ceiling.
STABILITY_SPAN = 10
BASE_MOMENTUM = 0.9


def trajectory_stability(loss_history: List[float]) -> float:
    """``exp(-var(last 10 losses))`` (unbiased variance), or 1.0 with fewer than 10 losses.

    Computed with torch on CPU in the default dtype, like the seed (so the value, and hence every
    parameter update, rounds exactly as the seed's does). The inputs are Python floats already on
    the host, so the final ``.item()`` reads a CPU tensor and waits for no device.
    """
    if len(loss_history) < STABILITY_SPAN:
        return 1.0
    recent = torch.tensor(loss_history[-STABILITY_SPAN:], device="cpu")
    return torch.exp(-torch.var(recent)).item()


def _check_lr(lr: Any, where: str) -> float:
    if isinstance(lr, Tensor):
        raise TypeError(f"{where}: lr must be a Python float, got a Tensor (a tensor lr would force a host sync "
                        "every step)")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"{where}: lr must be a real number, got {type(lr).__name__}")
    if not (lr >= 0.0 and math.isfinite(lr)):
        raise ValueError(f"{where}: lr must be a finite number >= 0, got {lr!r}")
    return lr


def _check_loss(loss: Any) -> float:
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(f"TrajectoryGuidedOptimizer.step: current_loss must be a scalar, got a tensor of "
                             f"shape {tuple(loss.shape)}")
        return float(loss)  # the caller chose to hand a tensor: this read is theirs, pass a float to avoid it
    if isinstance(loss, bool) or not isinstance(loss, numbers.Real):
        raise TypeError(f"TrajectoryGuidedOptimizer.step: current_loss must be a float (or None), got "
                        f"{type(loss).__name__}")
    return float(loss)


def _momentum_scalar(momentum: float, device: torch.device, dtype: torch.dtype) -> Union[float, Tensor]:
    """The momentum as _foreach_mul_ must see it to round like the seed's per-tensor ``mul_(m)``.

    On CPU, ``_foreach_mul_(half_tensors, python_float)`` rounds the scalar to the tensors' dtype
    first (0.9 -> 0.8984 in bf16), unlike ``Tensor.mul_(python_float)``, which multiplies in fp32.
    A 0-d fp32 tensor keeps the fp32 math (for 0-d params too: they promote to fp32 and round
    back once). It is a CPU tensor: no device sync. fp32/fp64 lists, and CUDA (opmath), round
    like the seed with the float itself; a 0-d fp64 tensor would not (0-d fp32 params promote).
    """
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        return torch.tensor(momentum, dtype=torch.float32)
    return momentum


class TrajectoryGuidedOptimizer(torch.optim.Optimizer):
    """Momentum SGD with loss-trajectory-adapted learning rate and momentum (see the module doc).

    Args:
        params: iterable of parameters or of param-group dicts, as for any ``torch.optim.Optimizer``.
        lr: base learning rate (float >= 0); each group may override it.
        trajectory_window: how many recent losses are kept (int >= 1). The stability estimate uses
            the last 10 of them, so a window below 10 keeps the stability at 1.0 (plain momentum 0.9).

    ``step(closure=None, current_loss=None)``:
        current_loss: the loss of this step as a Python float; it is appended to ``loss_history``
            (the oldest entry drops once the window is full). ``None`` records nothing.
        closure: re-evaluates the model (and its gradients) and returns the loss, as in
            ``torch.optim``; it runs before the update and its loss is returned. Its loss is *not*
            recorded (that would read a tensor on the host every step): pass ``current_loss``.
            The seed accepts a closure but never calls it; this is the one deliberate difference.

    State: per parameter ``state[p]["momentum_buffer"]`` (shaped like ``p``), created at the first
    step that sees a gradient for ``p``, as in the seed, so seed checkpoints load. ``state_dict()``
    also carries ``"loss_history"`` (the seed's is lost on save); a state dict without it (a seed
    checkpoint) leaves the current history as it is, and the extra key is ignored by the seed.
    Sparse gradients take a per-tensor path; everything else runs ``torch._foreach_*`` kernels
    grouped by (device, dtype), with no host sync on the tensor side.
    """

    def __init__(self, params: Iterable[Union[Tensor, Dict[str, Any]]], lr: float = 1e-3,
                 trajectory_window: int = 50) -> None:
        _check_lr(lr, "TrajectoryGuidedOptimizer")
        if isinstance(trajectory_window, bool) or not isinstance(trajectory_window, numbers.Integral):
            raise TypeError(f"TrajectoryGuidedOptimizer: trajectory_window must be an int, got "
                            f"{type(trajectory_window).__name__}")
        if trajectory_window < 1:
            raise ValueError(f"TrajectoryGuidedOptimizer: trajectory_window must be >= 1, got {trajectory_window}")
        super().__init__(params, dict(lr=lr, trajectory_window=int(trajectory_window)))
        self.loss_history: List[float] = []
        self.gradient_magnitude_history: List[float] = []  # kept for attribute parity; the seed never fills it

    # -- the seed's public surface ---------------------------------------------------------------

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if "lr" in param_group:
            _check_lr(param_group["lr"], "TrajectoryGuidedOptimizer param group")
        super().add_param_group(param_group)

    def compute_trajectory_stability(self, loss_history: List[float]) -> float:
        """See :func:`trajectory_stability`."""
        return trajectory_stability(loss_history)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, current_loss: Optional[float] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if current_loss is not None:
            self.loss_history.append(_check_loss(current_loss))
            del self.loss_history[: max(0, len(self.loss_history) - self.defaults["trajectory_window"])]

        stability = self.compute_trajectory_stability(self.loss_history)
        momentum = BASE_MOMENTUM * stability
        for group in self.param_groups:
            # Same Python float expression as the seed: the scalars must round identically.
            adapted_lr = group["lr"] * (0.5 + 0.5 * stability)
            dense, sparse = self._gather(group)
            for (device, dtype), (params, grads, bufs) in dense.items():
                # Two passes for buf (not one fused addcmul-style op) so every element rounds as
                # the seed's buf.mul_(m).add_(g); then p += -lr * buf.
                torch._foreach_mul_(bufs, _momentum_scalar(momentum, device, dtype))
                torch._foreach_add_(bufs, grads)
                torch._foreach_add_(params, bufs, alpha=-adapted_lr)
            for p, g, buf in sparse:  # dense buf += sparse grad has no foreach kernel
                buf.mul_(momentum).add_(g)
                p.add_(buf, alpha=-adapted_lr)
        return loss

    def _gather(self, group: Dict[str, Any]) -> Tuple[Dict[tuple, Tuple[list, list, list]], list]:
        """Lists (params, grads, momentum buffers) per (device, dtype) of the params with a grad;
        creates missing buffers (zeros, like the seed, so the first update rounds the same)."""
        dense: Dict[tuple, Tuple[list, list, list]] = defaultdict(lambda: ([], [], []))
        sparse = []
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            st = self.state[p]
            buf = st.get("momentum_buffer")
            if buf is None:
                buf = st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if g.is_sparse:
                sparse.append((p, g, buf))
                continue
            lists = dense[(p.device, p.dtype)]
            lists[0].append(p)
            lists[1].append(g)
            lists[2].append(buf)
        return dense, sparse

    # -- checkpoints -------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        sd["loss_history"] = list(self.loss_history)
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        history = state_dict.get("loss_history")
        super().load_state_dict(state_dict)
        if history is not None:
            window = self.defaults["trajectory_window"]
            self.loss_history = [float(x) for x in list(history)[-window:]]

    def __getstate__(self) -> Dict[str, Any]:
        # torch.optim pickles only defaults/state/param_groups; keep the history through copies too.
        state = super().__getstate__()
        state["loss_history"] = self.__dict__.get("loss_history", [])
        state["gradient_magnitude_history"] = self.__dict__.get("gradient_magnitude_history", [])
        return state
