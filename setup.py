"""Build: the pure-Python packages plus the optional int8 extension ``tape_kernels._C``.

The extension is optional: installation never fails because it cannot be built.

* CUDA code is compiled only when it can be: torch was built with CUDA, an ``nvcc`` is found, and
  that toolkit's ``include/cuda_runtime_api.h`` exists. A wrapper ``nvcc`` on the PATH (e.g.
  ``/usr/local/bin/nvcc`` exec-ing the real one) makes torch guess ``CUDA_HOME=/usr/local``, whose
  ``include/`` has no CUDA headers, so the toolkit is located here and ``CUDA_HOME`` set before
  torch's build helpers read it.
* If the CUDA build fails anyway, the CPU extension is built instead; if that fails too, the
  extension is skipped and the int8 ops fall back to PyTorch (one warning at run time). Each
  outcome is said in one line.
* The C++ standard is the one the installed torch's headers need: torch's ``BuildExtension``
  adds it (C++17 or C++20) when no ``-std`` flag is given, so none is given here.

``TAPE_KERNELS_SKIP_EXT=1`` skips the extension; ``TAPE_KERNELS_NO_CUDA=1`` builds the CPU one.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    # stderr reaches the user through pip's build log; one line per decision.
    print(f"tape_kernels._C: {msg}", file=sys.stderr, flush=True)


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _cuda_home() -> tuple[str | None, str]:
    """(toolkit root with nvcc and the runtime headers, or None; why not)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script: ask the compiler where its toolkit lives
            out = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True, timeout=30)
            for line in (out.stdout + out.stderr).splitlines():
                if "TOP=" in line:
                    candidates.append(line.split("TOP=", 1)[1].strip().strip('"'))
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for root in candidates:
        if not root:
            continue
        root = os.path.realpath(root)
        if os.path.isfile(os.path.join(root, "include", "cuda_runtime_api.h")) and os.access(
            os.path.join(root, "bin", "nvcc"), os.X_OK
        ):
            return root, ""
    if not nvcc:
        return None, "no nvcc found"
    return None, "nvcc found but no CUDA toolkit with include/cuda_runtime_api.h beside it"


def _nvcc_major(root: str) -> int | None:
    try:
        out = subprocess.run([os.path.join(root, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for tok in out.replace(",", " ").split():
        if tok.startswith("V") and tok[1:2].isdigit():
            return int(tok[1:].split(".")[0])
    return None


def _extensions() -> tuple[list, dict]:
    if _flag("TAPE_KERNELS_SKIP_EXT"):
        _say("skipped (TAPE_KERNELS_SKIP_EXT=1): the int8 ops use their PyTorch fallback")
        return [], {}
    cpp = sorted(glob.glob("csrc/*.cpp"))
    cu = sorted(glob.glob("csrc/*.cu"))
    if not cpp:
        return [], {}
    import torch

    cuda_root, why = None, "TAPE_KERNELS_NO_CUDA=1"
    if not _flag("TAPE_KERNELS_NO_CUDA"):
        if torch.version.cuda is None:
            why = f"torch {torch.__version__} has no CUDA"
        elif not cu:
            why = "no .cu sources"
        else:
            cuda_root, why = _cuda_home()
            if cuda_root is not None:
                major = _nvcc_major(cuda_root)
                want = int(torch.version.cuda.split(".")[0])
                if major != want:
                    why = f"nvcc in {cuda_root} is CUDA {major}, torch was built with CUDA {want}"
                    cuda_root = None
    if cuda_root is not None:
        os.environ["CUDA_HOME"] = cuda_root  # read by torch.utils.cpp_extension at import
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.6;8.9;9.0")
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # -fno-math-errno / -fno-trapping-math: no errno writes from sqrt and no trapping float compares,
    # so that the decode step's elementwise loops (selects, sqrt) vectorise. Neither changes a value.
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    major, minor, patch = (int("".join(c for c in part if c.isdigit()) or 0)
                           for part in (torch.__version__.split("+")[0].split(".") + ["0", "0"])[:3])
    version = [("TK_TORCH_MAJOR", str(major)), ("TK_TORCH_MINOR", str(minor)), ("TK_TORCH_PATCH", str(patch))]
    cpu_ext = CppExtension("tape_kernels._C", cpp, define_macros=version, extra_compile_args=cxx,
                           extra_link_args=["-fopenmp"])
    if cuda_root is None:
        _say(f"building the CPU extension only ({why})")
        ext = cpu_ext
    else:
        from torch.utils.cpp_extension import CUDAExtension

        _say(f"building the CPU + CUDA extension (toolkit {cuda_root})")
        ext = CUDAExtension(
            "tape_kernels._C",
            cpp + cu,
            define_macros=[("TK_WITH_CUDA", "1"), *version],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=["-fopenmp"],
        )

    class _OptionalBuild(BuildExtension):
        """Falls back CUDA -> CPU -> no extension instead of failing the installation."""

        def build_extensions(self) -> None:
            # torch's build_extensions patches the compiler's methods: restore them before a retry.
            saved = (self.compiler.__dict__.copy(), list(self.compiler.src_extensions))
            for attempt in ([ext, cpu_ext] if ext is not cpu_ext else [cpu_ext]):
                self.extensions = [attempt]
                try:
                    super().build_extensions()
                    return
                except Exception as e:  # compiler or toolchain failure
                    self.compiler.__dict__.clear()
                    self.compiler.__dict__.update(saved[0])
                    self.compiler.src_extensions = list(saved[1])
                    last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
                    if attempt is not cpu_ext:
                        _say(f"the CUDA build failed ({last}); building the CPU extension instead")
                    else:
                        _say(f"not built ({last}): the int8 ops use their PyTorch fallback")
            self.extensions = []

    return [ext], {"build_ext": _OptionalBuild.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()

setup(
    packages=["tape_kernels", "tapetransformer"],
    package_dir={"tape_kernels": "tape_kernels", "tapetransformer": "python/tapetransformer"},
    package_data={"tapetransformer": ["py.typed"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
