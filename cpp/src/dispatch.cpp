#include <atomic>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "persona4rec/cpu.hpp"

#if defined(P4R_HAVE_NEON) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

namespace persona4rec {

namespace {

bool cpu_has(SimdPath p) {
  switch (p) {
    case SimdPath::scalar:
      return true;
#if defined(P4R_HAVE_X86)
    // libgcc's checks include the OS's XSAVE support for the wider registers.
    case SimdPath::avx2:
      return __builtin_cpu_supports("avx2");
    case SimdPath::avx512vnni:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#endif
#if defined(P4R_HAVE_NEON)
    case SimdPath::neon:
#if defined(__linux__)
      return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__APPLE__)
      return true;
#else
      return false;
#endif
#endif
    default:
      return false;
  }
}

std::atomic<int> g_active{-1};
const char* g_source = "cpu";
std::once_flag g_init;

void init_active() {
  std::call_once(g_init, [] {
    SimdPath chosen = best_path();
    const char* env = std::getenv("PERSONA4REC_SIMD");
    if (env != nullptr && *env != '\0') {
      // A forced path that cannot run here is an error at import time: silently
      // running another path would make forced-path tests meaningless.
      chosen = simd_path_from_name(env);
      if (!path_available(chosen))
        throw std::invalid_argument(
            std::string("PERSONA4REC_SIMD=") + env +
            " is not available on this CPU/build; unset it or choose one of "
            "the paths listed by persona4rec.simd_info()['available']");
      g_source = "env";
    }
    g_active.store(int(chosen));
  });
}

}  // namespace

const char* simd_path_name(SimdPath p) {
  switch (p) {
    case SimdPath::scalar:
      return "scalar";
    case SimdPath::avx2:
      return "avx2";
    case SimdPath::avx512vnni:
      return "avx512vnni";
    case SimdPath::neon:
      return "neon";
  }
  return "unknown";
}

SimdPath simd_path_from_name(const std::string& name) {
  for (SimdPath p : {SimdPath::scalar, SimdPath::avx2, SimdPath::avx512vnni, SimdPath::neon})
    if (name == simd_path_name(p)) return p;
  throw std::invalid_argument("unknown SIMD path '" + name +
                              "': expected one of scalar, avx2, avx512vnni, neon");
}

std::vector<SimdPath> compiled_paths() {
  std::vector<SimdPath> out{SimdPath::scalar};
#if defined(P4R_HAVE_X86)
  out.push_back(SimdPath::avx2);
  out.push_back(SimdPath::avx512vnni);
#endif
#if defined(P4R_HAVE_NEON)
  out.push_back(SimdPath::neon);
#endif
  return out;
}

bool path_available(SimdPath p) {
  for (SimdPath c : compiled_paths())
    if (c == p) return cpu_has(p);
  return false;
}

std::vector<SimdPath> available_paths() {
  std::vector<SimdPath> out;
  for (SimdPath p : compiled_paths())
    if (cpu_has(p)) out.push_back(p);
  return out;
}

SimdPath best_path() {
  for (SimdPath p : {SimdPath::avx512vnni, SimdPath::neon, SimdPath::avx2})
    if (path_available(p)) return p;
  return SimdPath::scalar;
}

DotRowsFn dot_rows_for(SimdPath p) {
  switch (p) {
#if defined(P4R_HAVE_X86)
    case SimdPath::avx2:
      return &dot_rows_avx2;
    case SimdPath::avx512vnni:
      return &dot_rows_avx512vnni;
#endif
#if defined(P4R_HAVE_NEON)
    case SimdPath::neon:
      return &dot_rows_neon;
#endif
    default:
      return &dot_rows_scalar;
  }
}

DotTileFn dot_tile_for(SimdPath p) {
  switch (p) {
#if defined(P4R_HAVE_X86)
    case SimdPath::avx2:
      return &dot_tile_avx2;
    case SimdPath::avx512vnni:
      return &dot_tile_avx512vnni;
#endif
#if defined(P4R_HAVE_NEON)
    case SimdPath::neon:
      return &dot_tile_neon;
#endif
    default:
      return &dot_tile_scalar;
  }
}

SimdPath active_path() {
  init_active();
  return SimdPath(g_active.load(std::memory_order_relaxed));
}

void set_active_path(SimdPath p) {
  init_active();
  if (!path_available(p))
    throw std::invalid_argument(std::string("SIMD path '") + simd_path_name(p) +
                                "' is not available on this CPU/build");
  g_active.store(int(p));
  g_source = "set_simd";
}

DotRowsFn active_dot_rows() {
  return dot_rows_for(active_path());
}

DotTileFn active_dot_tile() {
  return dot_tile_for(active_path());
}

const char* active_path_source() {
  init_active();
  return g_source;
}

}  // namespace persona4rec
