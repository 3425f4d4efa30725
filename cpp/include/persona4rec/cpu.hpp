// Run-time choice of the kernel path from CPU capabilities, overridable by the
// PERSONA4REC_SIMD environment variable (scalar | avx2 | avx512vnni | neon).
#pragma once
#include <string>
#include <vector>

#include "persona4rec/kernels.hpp"

namespace persona4rec {

enum class SimdPath { scalar = 0, avx2 = 1, avx512vnni = 2, neon = 3 };

const char* simd_path_name(SimdPath p);
// Throws std::invalid_argument for an unknown name.
SimdPath simd_path_from_name(const std::string& name);

// Paths compiled into this build.
std::vector<SimdPath> compiled_paths();
// Paths this CPU (and OS) can run.
std::vector<SimdPath> available_paths();
bool path_available(SimdPath p);
// The best available path.
SimdPath best_path();

// The active path: chosen once from PERSONA4REC_SIMD or best_path(); may be changed
// by set_active_path (intended for tests and benchmarks, not for concurrent use).
SimdPath active_path();
// Throws std::invalid_argument if the path cannot run here.
void set_active_path(SimdPath p);
DotRowsFn dot_rows_for(SimdPath p);
DotRowsFn active_dot_rows();
DotTileFn dot_tile_for(SimdPath p);
DotTileFn active_dot_tile();
// Why the active path was chosen ("cpu", "env").
const char* active_path_source();

}  // namespace persona4rec
