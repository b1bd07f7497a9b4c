"""FAISS's bundled OpenBLAS runs the CPU's own kernels: an Intel CPU newer than that OpenBLAS
(Sapphire / Emerald Rapids) would otherwise get its SSE3 fallback, Prescott, and every FAISS
matrix product 4x slower (:func:`dpr_jax.index.faiss_index.openblas_coretype`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dpr_jax.index.faiss_index import openblas_coretype

AVX512 = "fpu sse2 avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16 amx_bf16"


def _cpuinfo(vendor: str, flags: str) -> str:
    return f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: 6\nflags\t\t: {flags}\n"


def test_the_core_is_named_for_intel_with_avx512_only():
    assert openblas_coretype(_cpuinfo("GenuineIntel", AVX512), {}) == "SkylakeX"
    assert openblas_coretype(_cpuinfo("AuthenticAMD", AVX512), {}) == "Zen"  # what it picks for Zen
    assert openblas_coretype(_cpuinfo("GenuineIntel", "fpu sse2 avx2 fma"), {}) == "Haswell"
    assert openblas_coretype(_cpuinfo("GenuineIntel", "avx512f avx512dq avx2 fma"), {}) == (
        "Haswell"  # AVX-512 without BW / VL: not SkylakeX's
    )
    assert openblas_coretype(_cpuinfo("GenuineIntel", "fpu sse2 sse3"), {}) is None
    assert openblas_coretype(_cpuinfo("HygonGenuine", "avx2 fma"), {}) is None
    # the user's own setting stands
    assert (
        openblas_coretype(_cpuinfo("GenuineIntel", AVX512), {"OPENBLAS_CORETYPE": "Haswell"})
        is None
    )
    assert openblas_coretype("", {}) is None


def _core_in_a_fresh_process(code: str) -> str:
    env = {k: v for k, v in __import__("os").environ.items() if k != "OPENBLAS_CORETYPE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).parents[1], timeout=300, check=True)  # fmt: skip
    return out.stdout.strip().splitlines()[-1]


def test_faiss_runs_the_cpu_kernels_openblas_reports():
    """In a fresh process, FAISS imported through dpr_jax runs the kernels
    :func:`openblas_coretype` names (OpenBLAS's own ``openblas_get_corename`` says so)."""
    pytest.importorskip("faiss")
    want = openblas_coretype(Path("/proc/cpuinfo").read_text(), {})
    got = _core_in_a_fresh_process(
        "from dpr_jax.index.faiss_index import faiss_blas_core; print(faiss_blas_core())"
    )
    if got == "None":
        pytest.skip("this FAISS brings no OpenBLAS of its own")
    if want is None:
        pytest.skip("a CPU whose kernels dpr_jax leaves to OpenBLAS")
    assert got == want
