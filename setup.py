"""Builds trajops and its C++ extension trajops._C.

TRAJOPS_NO_EXT=1      build no extension (the pure-PyTorch reference then serves every op)
TRAJOPS_PORTABLE=1    no -march=native (for a wheel that runs on other x86 machines)
CUDA sources (csrc/cuda/*.cu) are compiled only when torch has CUDA and nvcc is found.
"""
import glob
import os
import platform

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = find_packages(include=["trajops", "trajops.*"]) + ["trajops.triton_kernels"]
# triton_kernels/ ships inside trajops so that it never shadows PyPI's top-level `triton_kernels`.
PACKAGE_DIR = {"trajops.triton_kernels": "triton_kernels"}


def _extensions():
    if os.environ.get("TRAJOPS_NO_EXT", "0") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp"]
    if os.environ.get("TRAJOPS_PORTABLE", "0") != "1" and platform.machine() in ("x86_64", "AMD64"):
        cxx.append("-march=native")
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    use_cuda = bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    kwargs = dict(
        name="trajops._C",
        sources=sources + (cuda_sources if use_cuda else []),
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]} if use_cuda else {"cxx": cxx},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    ext = (cpp_extension.CUDAExtension if use_cuda else cpp_extension.CppExtension)(**kwargs)
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = _extensions()
setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
