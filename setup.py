"""Build: the pure-Python packages plus the optional int8 extension ``tape_kernels._C``.

The extension is a ``CUDAExtension`` when torch has CUDA and nvcc is present, else a
``CppExtension``; ``TAPE_KERNELS_SKIP_EXT=1`` skips it (the Python fallbacks then run).
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions() -> tuple[list, dict]:
    if os.environ.get("TAPE_KERNELS_SKIP_EXT", "0") not in ("", "0"):
        return [], {}
    cpp = sorted(glob.glob("csrc/*.cpp"))
    cu = sorted(glob.glob("csrc/*.cu"))
    if not cpp and not cu:
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = torch.version.cuda is not None and (
        shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME") is not None
    )
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    define = [("TK_WITH_CUDA", "1")] if with_cuda else []
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.6;8.9;9.0")
        ext = CUDAExtension(
            "tape_kernels._C",
            cpp + cu,
            define_macros=define,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("tape_kernels._C", cpp, extra_compile_args=cxx, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()

setup(
    packages=["tape_kernels", "tapetransformer"],
    package_dir={"tape_kernels": "tape_kernels", "tapetransformer": "python/tapetransformer"},
    package_data={"tapetransformer": ["py.typed"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
