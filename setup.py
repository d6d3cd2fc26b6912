"""Setuptools shim: the package metadata is in pyproject.toml.

The native kernels in csrc/ are optional and, by default, not compiled here: every machine installs the same way,
and cao2core.kernels JIT-compiles them (ninja) on first use or falls back to plain torch (docs/kernels.md).

    CAO2_BUILD_EXT=1 pip install -e . --no-build-isolation

builds them ahead of time against the torch already installed (torch is deliberately not a build requirement:
build isolation would download another torch): the C++ CPU ops as cao2core/kernels/_C*.so and, where torch is a
CUDA build and a CUDA toolkit is found (CUDA_HOME), the CUDA ops as cao2core/kernels/_C_cuda*.so.
CAO2_BUILD_CUDA=0 skips the CUDA part, CAO2_BUILD_CUDA=1 makes its absence an error. With no GPU visible set
TORCH_CUDA_ARCH_LIST (e.g. "9.0").
"""
import os

from setuptools import setup

CFLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off"]
NVCCFLAGS = ["-O3", "-fmad=false", "--expt-relaxed-constexpr"]


def _native():
    if os.environ.get("CAO2_BUILD_EXT", "") in ("", "0"):
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        raise SystemExit(f"CAO2_BUILD_EXT=1 needs torch importable at build time ({exc}); install torch first and "
                         "use `pip install -e . --no-build-isolation`") from exc
    here = os.path.dirname(os.path.abspath(__file__))
    inc = [os.path.join(here, "csrc")]
    exts = [CppExtension("cao2core.kernels._C", ["csrc/clo_cpu.cpp"], include_dirs=inc, extra_compile_args=CFLAGS)]
    want = os.environ.get("CAO2_BUILD_CUDA", "auto")
    if want != "0":
        if torch.version.cuda and CUDA_HOME:
            exts.append(CUDAExtension("cao2core.kernels._C_cuda", ["csrc/clo_cuda.cpp", "csrc/clo_cuda_kernels.cu"],
                                      include_dirs=inc, extra_compile_args={"cxx": CFLAGS, "nvcc": NVCCFLAGS}))
        else:
            why = f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
            if want == "1":
                raise SystemExit(f"CAO2_BUILD_CUDA=1 but no CUDA build is possible ({why})")
            print(f"cao2: CUDA kernels skipped ({why})")
    return dict(ext_modules=exts, cmdclass={"build_ext": BuildExtension})


setup(**_native())
