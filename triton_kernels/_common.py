"""Shared host-side helpers of the Triton kernels: launch with a shared-memory budget, fallback on
``OutOfResources``, and an ahead-of-time (AOT) resource check that needs no GPU.

Why: a kernel's shared memory depends on its tiles, its pipeline stages (each stage holds a copy of
every pipelined tile: K, V *and* the mask tile) and on the dtype, and only the compiler knows the
exact number. A wrong guess used to surface on the user's GPU as a Triton traceback
(``OutOfResources: shared memory, Required: 262144``). Here every launcher

* lists its candidate configurations from fastest to smallest (:class:`Config`), each with an
  estimate of its shared memory, and launches the first one whose estimate fits the device
  (:func:`launch`);
* catches ``OutOfResources`` at the first launch of a variant, moves on to the next candidate and
  remembers the one that worked for that variant (no second failure, no retry cost later);
* raises a ``ValueError`` naming the limit when no candidate fits, before any launch.

:func:`capture` records the launches a launcher would make (its arguments, its chosen config and the
device's specialization) instead of running them; :func:`aot_compile` then compiles each recorded
launch for an sm_90 or sm_80 target with Triton's own binder, so the test on the CPU-only CI sees
exactly the specialization (``tt.divisibility``, equal-to-1 integers, constexprs) of a real launch
and reads the compiler's shared memory, registers and spills (tests/test_triton_resources.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import triton
from triton.runtime.errors import OutOfResources

__all__ = ["INTERPRET", "cdiv", "next_power_of_2", "compute_dtypes", "Config", "DeviceSpec", "SMEM_LIMITS", "launch", "capture", "aot_compile",
           "resource_usage", "device_spec", "plan", "Captured"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code. triton.cdiv and triton.next_power_of_2 are ``constexpr_function``s
    (Triton >= 3.6): ~2 us of Python per host call, and a launcher makes up to a dozen, on the decode
    path that is launch-bound. Inside @triton.jit code keep using triton's."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n for host code (0 for n = 0, as triton.next_power_of_2)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def compute_dtypes(dtype) -> tuple:
    """(torch dtype, Triton dtype) a kernel accumulates in for inputs of torch ``dtype``: fp64 for fp64
    (gradcheck needs it), fp32 for everything else."""
    import torch
    import triton.language as tl

    if dtype == torch.float64:
        return torch.float64, tl.float64
    return torch.float32, tl.float32


# Opt-in shared memory per block (bytes), by compute capability major: what Triton checks against.
SMEM_LIMITS = {9: 232448, 8: 166912, 7: 101376}
# Estimates are rough (layout-conversion scratch is not counted); the OutOfResources fallback and the
# AOT test (tests/test_triton_resources.py) catch what they miss.
_ESTIMATE_MARGIN = 1.0
# Register words per thread that a config's tiles may hold: calibrated on sm_90 with the AOT check
# (attention tiles estimated at <= 224 compiled without spills, 240+ spilled).
REG_BUDGET = 224


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """What a launcher may ask about the device it launches on."""
    capability: Tuple[int, int]
    smem: int  # max shared memory per block (opt-in), bytes
    sm_count: int


@dataclasses.dataclass(frozen=True)
class Config:
    """One launch configuration: constexpr tiles + num_warps/num_stages, and its shared-memory estimate."""
    tiles: Tuple[Tuple[str, int], ...]
    num_warps: int = 4
    num_stages: int = 1
    smem: int = 0  # estimated bytes
    regs: int = 0  # estimated 32-bit registers per thread held by tiles (0: not estimated)

    @staticmethod
    def make(smem: int = 0, num_warps: int = 4, num_stages: int = 1, regs: int = 0, **tiles) -> "Config":
        return Config(tuple(sorted(tiles.items())), num_warps, num_stages, smem, regs)

    # made once per Config (launchers read them at every launch: a decode step is host-bound); read-only use
    @functools.cached_property
    def kwargs(self) -> dict:
        if INTERPRET:
            return dict(self.tiles)
        return dict(self.tiles, num_warps=self.num_warps, num_stages=self.num_stages)

    @functools.cached_property
    def _tile_map(self) -> dict:
        return dict(self.tiles)

    def __getitem__(self, name: str) -> int:
        return self._tile_map[name]


@dataclasses.dataclass
class Captured:
    """A launch recorded by :func:`capture`: enough to compile it ahead of time."""
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict
    key: tuple


_state = threading.local()
_chosen: Dict[tuple, int] = {}  # (kernel name, variant key, smem limit) -> index of the working candidate
_lock = threading.Lock()


def _capturing() -> Optional[Tuple[DeviceSpec, List[Captured]]]:
    return getattr(_state, "capture", None)


@contextlib.contextmanager
def capture(spec: DeviceSpec) -> Iterator[List[Captured]]:
    """Record every Triton launch (for :func:`aot_compile`) instead of running it, as if on a device
    ``spec``: launchers run unchanged on CPU tensors (their outputs stay uninitialized). Test-only:
    it patches ``JITFunction.run`` for the duration, so it is not thread-safe."""
    from triton.runtime.jit import JITFunction

    prev, prev_run = _capturing(), JITFunction.run
    records: List[Captured] = []

    def run(self, *args, grid, warmup=False, **kwargs):
        records.append(Captured(self, grid, args, kwargs, ()))

    _state.capture = (spec, records)
    JITFunction.run = run
    try:
        yield records
    finally:
        JITFunction.run = prev_run
        _state.capture = prev


@functools.lru_cache(maxsize=None)
def _cuda_spec(index: int) -> DeviceSpec:
    import torch

    p = torch.cuda.get_device_properties(index)
    smem = getattr(p, "shared_memory_per_block_optin", 0) or SMEM_LIMITS.get(p.major, 101376)
    return DeviceSpec((p.major, p.minor), int(smem), int(p.multi_processor_count))


_INTERPRETER_SPEC = DeviceSpec((9, 0), SMEM_LIMITS[9], 8)  # interpreter: any plan works, few programs


def device_spec(device) -> DeviceSpec:
    """The DeviceSpec launches on ``device`` are planned for (the captured target while capturing)."""
    cap = _capturing()
    if cap is not None:
        return cap[0]
    if getattr(device, "type", "cuda") != "cuda" or INTERPRET:
        return _INTERPRETER_SPEC
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_spec(index)


_NAMES: Dict[int, str] = {}  # id(kernel) -> name (kernels are module-level objects that live as long as we do)


def _name(kernel) -> str:
    name = _NAMES.get(id(kernel))
    if name is None:
        fn = getattr(kernel, "fn", kernel)
        name = _NAMES[id(kernel)] = getattr(fn, "__qualname__", repr(fn))
    return name


# ``what`` names the case in errors and warnings only: launchers on the decode path pass a callable so that the
# message (device and dtype reprs, ~3 us) is formatted only when needed
What = Union[str, Callable[[], str]]


def _text(what: What) -> str:
    return what() if callable(what) else what


def plan(kernel, candidates: Sequence[Config], key: tuple, device, what: What) -> Config:
    """The config :func:`launch` will try first for this variant (for launchers whose scratch or grid
    depends on the tiles: size them from this, then launch with the same candidates)."""
    return candidates[_first(kernel, candidates, key, device_spec(device), what)]


def _first(kernel, candidates, key, spec: DeviceSpec, what: What) -> int:
    budget = int(spec.smem * _ESTIMATE_MARGIN)
    start = _chosen.get((_name(kernel), key, spec.smem))
    # The first candidate is the measured-fastest tiles: taken whenever it fits shared memory, even if
    # it spills a little (a sweep found it faster). Smaller ones must also fit the register budget.
    if start is None and candidates and candidates[0].smem <= budget:
        start = 0
    if start is None:
        start = next((i for i, c in enumerate(candidates) if c.smem <= budget and c.regs <= REG_BUDGET), None)
    if start is None:  # nothing without spills: the fastest that fits shared memory
        start = next((i for i, c in enumerate(candidates) if c.smem <= budget), None)
    if start is None:
        raise ValueError(
            f"{_text(what)}: no kernel configuration fits this GPU's shared memory ({spec.smem} bytes per block); "
            f"the smallest needs about {min(c.smem for c in candidates)} bytes")
    return start


def launch(kernel, grid: Callable[[Config], tuple], args, candidates: Sequence[Config], key: tuple,
           device, what: What, **flags) -> Config:
    """Launch ``kernel[grid(cfg)](*args, **flags, **cfg.kwargs)`` with the first candidate that fits.
    ``args`` may be a callable cfg -> args (TMA descriptors carry the tile shape).

    ``candidates`` go from fastest to smallest; ``key`` names the variant (every constexpr that changes
    the kernel's resources: dtype, head sizes, mask, causal...). The first candidate whose estimate
    fits the device's shared memory is tried; on ``OutOfResources`` the next one is, and the one that
    worked is remembered for ``key``. No candidate fitting raises ValueError (``what`` names the case).
    Returns the config used (launchers size their grids and scratch from it).
    """
    spec = device_spec(device)
    mem_key = (_name(kernel), key, spec.smem)
    start = _first(kernel, candidates, key, spec, what)
    argf = args if callable(args) else (lambda cfg: args)
    if _capturing() is not None:  # recorded by the patched JITFunction.run, never fails
        cfg = candidates[start]
        kernel[grid(cfg)](*argf(cfg), **flags, **cfg.kwargs)
        return cfg
    for i in range(start, len(candidates)):
        cfg = candidates[i]
        try:
            kernel[grid(cfg)](*argf(cfg), **flags, **cfg.kwargs)
        except OutOfResources as e:
            if i + 1 == len(candidates):
                raise ValueError(f"{_text(what)}: no kernel configuration fits this GPU ({e})") from None
            continue
        if i != start or mem_key not in _chosen:
            with _lock:
                _chosen[mem_key] = i
            if i != start:
                warnings.warn(f"{_text(what)}: the planned tiles ran out of resources on this GPU; using smaller ones "
                              f"({dict(cfg.tiles)}, {cfg.num_stages} stages) for this variant from now on",
                              RuntimeWarning, stacklevel=3)
        return cfg
    raise AssertionError("unreachable")


def aot_compile(c: Captured, capability: int):
    """Compile a captured launch for ``cuda:<capability>`` (e.g. 90, 80) without a GPU, with the
    specialization Triton's own binder derives from the launch's arguments; returns the
    CompiledKernel (``metadata.shared``: dynamic shared memory; see :func:`resource_usage`)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = c.kernel
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(c.kwargs, debug=False)
    bound_args, specialization, options = binder(*c.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def resource_usage(compiled) -> dict:
    """{"shared", "regs", "stack", "local"} of a compiled kernel, read from its cubin with the cuobjdump
    that Triton ships (no GPU needed). A nonzero stack frame or local memory means register spills."""
    import re
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text))
    return {"shared": int(compiled.metadata.shared), "regs": int(fields.get("REG", 0)),
            "stack": int(fields.get("STACK", 0)), "local": int(fields.get("LOCAL", 0))}
