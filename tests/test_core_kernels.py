"""Native kernels against plain references: quantization, exact int8 dots, every SIMD path."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from persona4rec import kernels
from persona4rec.kernels import dot_int8, quantize, simd_info

DIMS = [1, 3, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 383, 384, 385, 1024, 4096]
AVAILABLE = simd_info()["available"]


@pytest.fixture(params=AVAILABLE)
def simd_path(request):
    with kernels.forced_simd(request.param):
        yield request.param


def reference_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    max_abs = np.abs(x).max(axis=1)
    scales = (max_abs / np.float32(127)).astype(np.float32)
    inv = np.where(max_abs > 0, np.float32(127) / np.where(max_abs > 0, max_abs, 1), 0).astype(np.float32)
    codes = np.clip(np.rint(x * inv[:, None]), -127, 127).astype(np.int8)
    return codes, scales


def test_simd_info_reports_paths():
    info = simd_info()
    assert info["active"] in info["available"]
    assert set(info["available"]) <= set(info["compiled"])
    assert "scalar" in info["available"]


@pytest.mark.parametrize("d", DIMS)
def test_quantize_matches_reference_and_bounds(d):
    rng = np.random.default_rng(d)
    x = rng.standard_normal((7, d)).astype(np.float32) * rng.uniform(0.01, 100, size=(7, 1)).astype(np.float32)
    codes, scales = quantize(x)
    ref_codes, ref_scales = reference_quantize(x)
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_array_equal(scales, ref_scales)
    assert codes.min() >= -127 and codes.max() <= 127
    # Every coordinate is within half a step of the original.
    err = np.abs(kernels.dequantize(codes, scales) - x)
    assert np.all(err <= scales[:, None] * 0.5 * (1 + 1e-5) + 1e-30)


def test_quantize_zero_row_and_extremes():
    x = np.zeros((3, 5), dtype=np.float32)
    x[1] = [-1, 1, 0.5, -0.5, 0]
    x[2] = [np.float32(3e38), -np.float32(3e38), 1, 0, 0]
    codes, scales = quantize(x)
    assert scales[0] == 0 and not codes[0].any()
    np.testing.assert_array_equal(codes[1], [-127, 127, 64, -64, 0])
    assert codes[2, 0] == 127 and codes[2, 1] == -127


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantize_rejects_non_finite(bad):
    x = np.ones((4, 8), dtype=np.float32)
    x[2, 3] = bad
    with pytest.raises(ValueError, match="row 2 contains NaN or infinity"):
        quantize(x)


@pytest.mark.parametrize(
    "x, message",
    [
        (np.ones((2, 3), dtype=np.float64), "dtype float32"),
        (np.ones(3, dtype=np.float32), "2-dimensional"),
        (np.ones((3, 4), dtype=np.float32)[:, ::2], "C-contiguous"),
        ([[1.0, 2.0]], "numpy array"),
    ],
)
def test_quantize_rejects_bad_arrays(x, message):
    with pytest.raises(ValueError, match=message):
        quantize(x)


@pytest.mark.parametrize("d", DIMS)
def test_dot_exact_on_every_path(simd_path, d):
    rng = np.random.default_rng(1000 + d)
    rows = rng.integers(-127, 128, size=(9, d), dtype=np.int8)
    rows[0] = 127
    rows[1] = -127
    q = rng.integers(-127, 128, size=d, dtype=np.int8)
    expected = rows.astype(np.int64) @ q.astype(np.int64)
    got = dot_int8(q, rows, simd=simd_path)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)
    # The extremes: all +-127 against +-127 (the largest magnitudes the paths must survive).
    for qv in (127, -127):
        qq = np.full(d, qv, dtype=np.int8)
        np.testing.assert_array_equal(dot_int8(qq, rows, simd=simd_path), rows.astype(np.int64) @ qq.astype(np.int64))


@settings(max_examples=60, deadline=None)
@given(
    d=st.integers(1, 300),
    n=st.integers(0, 9),
    seed=st.integers(0, 2**32 - 1),
)
def test_dot_paths_agree_with_scalar(d, n, seed):
    rng = np.random.default_rng(seed)
    rows = rng.integers(-127, 128, size=(n, d), dtype=np.int8)
    q = rng.integers(-127, 128, size=d, dtype=np.int8)
    reference = dot_int8(q, rows, simd="scalar")
    np.testing.assert_array_equal(reference, rows.astype(np.int64) @ q.astype(np.int64))
    for path in AVAILABLE:
        np.testing.assert_array_equal(dot_int8(q, rows, simd=path), reference)


def test_dot_rejects_minus_128_and_bad_shapes():
    rows = np.zeros((2, 4), dtype=np.int8)
    with pytest.raises(ValueError, match=r"\[-127, 127\]"):
        dot_int8(np.array([-128, 0, 0, 0], dtype=np.int8), rows)
    with pytest.raises(ValueError, match="dimension"):
        dot_int8(np.zeros(5, dtype=np.int8), rows)
    with pytest.raises(ValueError, match="unknown SIMD path"):
        dot_int8(np.zeros(4, dtype=np.int8), rows, simd="sse9")


def _python_with_env(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=60)


@pytest.mark.parametrize("path", AVAILABLE)
def test_env_variable_forces_path(path):
    out = _python_with_env("import persona4rec; i = persona4rec.simd_info(); print(i['active'], i['source'])",
                           PERSONA4REC_SIMD=path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [path, "env"]


def test_env_variable_rejects_unknown_or_unavailable_path():
    out = _python_with_env("import persona4rec", PERSONA4REC_SIMD="sse9")
    assert out.returncode != 0 and "unknown SIMD path" in out.stderr
    missing = [p for p in simd_info()["compiled"] if p not in AVAILABLE]
    if missing:
        out = _python_with_env("import persona4rec", PERSONA4REC_SIMD=missing[0])
        assert out.returncode != 0 and "not available" in out.stderr


def test_set_simd_rejects_unavailable_path():
    missing = [p for p in ("avx2", "avx512vnni", "neon") if p not in AVAILABLE]
    for p in missing:
        with pytest.raises(ValueError, match="not available"):
            kernels.set_simd(p)
    assert simd_info()["active"] in AVAILABLE
