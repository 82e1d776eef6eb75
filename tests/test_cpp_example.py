"""examples/cpp: a libtorch program (no Python) calls trajops' ops through c10::Dispatcher and
differentiates them with libtorch autograd; its outputs and gradients must equal the Python API's.

The program prints every input it built and every result (fp64, 17 significant digits), so this
test recomputes the same values from exactly the same inputs. The build (CMake + the C++ compiler,
~20-30 s on 2 cores the first time) goes to build/cpp-example, next to setup.py's build/ (git-ignored,
removed by `make clean`); a rebuild with nothing changed takes about a second.
"""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict

import pytest
import torch

import trajops
from trajops._library import SCHEMAS
from conftest import assert_close

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "examples" / "cpp"
BUILD = ROOT / "build" / "cpp-example"
BINARY = BUILD / "trajops_example"
# The only Python symbol _C.abi3.so may import: PyInit__C's PyModule_Create, weak (csrc/trajops.cpp)
# and only called by `import trajops._C`. Any other Python symbol (PyExc_*, _Py_NoneStruct, a Python
# call from a kernel) would make the library unloadable without libpython.
ALLOWED_PYTHON_SYMBOLS = {"PyModule_Create2"}


def _extension_path() -> str:
    if not trajops.HAS_EXTENSION:
        pytest.skip("trajops._C is not built/loaded (this test needs the C++ operator library)")
    return importlib.import_module("trajops._C").__file__


def _cxx_compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


def _build() -> Path:
    cmake = shutil.which("cmake")
    if cmake is None or _cxx_compiler() is None:
        pytest.skip(f"examples/cpp needs cmake and a C++ compiler (cmake: {cmake}, compiler: {_cxx_compiler()})")
    configure = [cmake, "-S", str(SOURCE), "-B", str(BUILD), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    done = _run(configure)
    if done.returncode != 0:  # a stale cache (moved checkout, other torch): start over once
        shutil.rmtree(BUILD, ignore_errors=True)
        done = _run(configure)
    assert done.returncode == 0, f"cmake configure failed:\n{done.stdout}\n{done.stderr}"
    done = _run([cmake, "--build", str(BUILD)])
    assert done.returncode == 0, f"cmake build failed:\n{done.stdout}\n{done.stderr}"
    return BINARY


def _host_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_BIND_NOW", "LD_PRELOAD")}
    return {**env, **extra}


def _parse(stdout: str) -> Dict[str, object]:
    """'<name> <d0,d1,..|-> <values...>' lines -> fp64 tensors; 'schema <text>' -> str."""
    result: Dict[str, object] = {}
    for line in stdout.splitlines():
        name, rest = line.split(" ", 1)
        if name == "schema":
            result.setdefault("schemas", []).append(rest)
            continue
        dims, *values = rest.split(" ")
        shape = [] if dims == "-" else [int(d) for d in dims.split(",")]
        result[name] = torch.tensor([float(v) for v in values], dtype=torch.float64).reshape(shape)
    return result


@pytest.fixture(scope="module")
def printed() -> Dict[str, object]:
    so = _extension_path()
    binary = _build()
    done = _run([str(binary), so], env=_host_env())
    assert done.returncode == 0, f"trajops_example failed ({done.returncode}):\n{done.stderr[-4000:]}"
    return _parse(done.stdout)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.clone().requires_grad_()


def test_schemas_seen_from_cpp_are_the_python_ones(printed):
    seen = [torch._C.parse_schema(s) for s in printed["schemas"]]
    assert [s.name for s in seen] == [f"trajops::{op}{suffix}" for op in ("trajectory_flow", "stp_loss",
                                      "temperature_attention") for suffix in ("", "_backward")]
    for schema in seen:
        assert schema == torch._C.parse_schema("trajops::" + SCHEMAS[schema.name.split("::")[1]])


def test_trajectory_flow_forward_and_backward(printed):
    p = printed
    x = _leaf(p["flow.x"])
    out = trajops.trajectory_flow(x, int(p["flow.window"]), float(p["flow.eps"]))
    (out * p["flow.w"]).sum().backward()
    assert p["flow.out"].abs().max() > 0.1 and p["flow.grad_x"].abs().max() > 0.1  # not a trivial case
    assert_close(p["flow.out"], out.detach())
    assert_close(p["flow.grad_x"], x.grad)


def test_stp_loss_forward_and_backward(printed):
    p = printed
    h0, h1 = _leaf(p["stp.h0"]), _leaf(p["stp.h1"])
    losses = trajops.stp_loss(
        [h0, h1], triples=p["stp.triples"].long(), lengths=p["stp.lengths"].long(), reduction="none"
    )
    (losses * p["stp.w"]).sum().backward()
    assert_close(p["stp.losses"], losses.detach())
    # Gradients of both layers: a wrapper that dropped a layer or misordered the saved tensors fails.
    assert p["stp.grad_h0"].abs().max() > 1e-3 and p["stp.grad_h1"].abs().max() > 1e-3
    assert_close(p["stp.grad_h0"], h0.grad)
    assert_close(p["stp.grad_h1"], h1.grad)
    # Row 1 has length 5: position 5 is padding and gets no gradient from C++ either.
    assert p["stp.grad_h0"][1, 5].abs().max() == 0


@pytest.mark.parametrize("case", ["attn", "attn_masked"])
def test_temperature_attention_forward_and_backward(printed, case):
    p = printed
    q, k, v, tau = (_leaf(p[f"attn.{n}"]) for n in ("q", "k", "v", "tau"))
    mask = p["attn_masked.mask"].bool() if case == "attn_masked" else None
    out, lse = trajops.temperature_attention(q, k, v, tau, causal=True, attn_mask=mask, return_lse=True)
    total = (out * p["attn.w_out"]).sum()
    if case == "attn":  # the backward op gets grad_lse too; attn_masked gets None
        total = total + (lse * p["attn.w_lse"]).sum()
    total.backward()
    assert_close(p[f"{case}.out"], out.detach())
    assert_close(p[f"{case}.lse"], lse.detach())
    for name, t in (("q", q), ("k", k), ("v", v), ("tau", tau)):
        assert p[f"{case}.grad_{name}"].abs().max() > 1e-3, name
        assert_close(p[f"{case}.grad_{name}"], t.grad)
    # The mask and the lse term change the results, so a wrapper that dropped either fails above.
    assert not torch.allclose(p["attn.out"], p["attn_masked.out"])
    assert not torch.allclose(p["attn.grad_tau"], p["attn_masked.grad_tau"])
    # Key 1 of batch 1 is hidden from every query: it gets no gradient.
    assert p["attn_masked.grad_k"][1, :, 1].abs().max() == 0 and p["attn_masked.grad_v"][1, :, 1].abs().max() == 0


def test_library_imports_no_python_data_symbols():
    so = _extension_path()
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) not found")
    done = _run([nm, "-D", "--undefined-only", so])
    assert done.returncode == 0, done.stderr
    imported = {line.split()[-1].split("@")[0] for line in done.stdout.splitlines() if line.strip()}
    python = {s for s in imported if s.startswith(("Py", "_Py"))}
    assert python <= ALLOWED_PYTHON_SYMBOLS, f"_C.abi3.so now needs libpython for {sorted(python)}"
    weak = {line.split()[-1].split("@")[0] for line in done.stdout.splitlines() if line.split()[:1] == ["w"]}
    assert python <= weak, f"the Python symbols {sorted(python - weak)} must be weak (csrc/trajops.cpp)"


def test_eager_binding_loads_without_libpython(printed):
    # LD_BIND_NOW=1 resolves every symbol at dlopen time, as RTLD_NOW and at::DynamicLibrary do: a
    # non-weak PyModule_Create2 fails the load with "undefined symbol" in this Python-free process.
    done = _run([str(BINARY), _extension_path()], env=_host_env(LD_BIND_NOW="1"))
    assert done.returncode == 0, f"trajops_example under LD_BIND_NOW=1 failed:\n{done.stderr[-2000:]}"
    assert _parse(done.stdout)["flow.out"].shape == printed["flow.out"].shape


def test_bad_library_path_is_a_clear_error(printed, tmp_path):
    done = _run([str(BINARY), str(tmp_path / "missing.so")], env=_host_env())
    assert done.returncode == 1
    assert "cannot load" in done.stderr and "missing.so" in done.stderr
