"""Checks the installed (not the source tree's) persona4rec core: where it was imported from and
which SIMD paths it was compiled with. Run against a wheel by scripts/wheel.sh and cibuildwheel."""

from __future__ import annotations

import platform
import sys

import persona4rec._core as core
from persona4rec import simd_info

# Every x86_64 build carries the AVX2 and AVX-512 VNNI kernels, every aarch64 build the NEON one;
# which of them runs is decided on the user's CPU.
EXPECTED_COMPILED = {
    "x86_64": ["scalar", "avx2", "avx512vnni"],
    "AMD64": ["scalar", "avx2", "avx512vnni"],
    "aarch64": ["scalar", "neon"],
    "arm64": ["scalar", "neon"],
}

if "site-packages" not in core.__file__:
    sys.exit(f"persona4rec._core was imported from {core.__file__}, not from an installed wheel")
info = simd_info()
expected = EXPECTED_COMPILED.get(platform.machine())
if expected is not None and info["compiled"] != expected:
    sys.exit(f"compiled SIMD paths {info['compiled']}, expected {expected} on {platform.machine()}")
if info["active"] not in info["available"] or not set(info["available"]) <= set(info["compiled"]):
    sys.exit(f"inconsistent simd_info: {info}")
print("installed core:", core.__file__)
print("simd_info:", info)
