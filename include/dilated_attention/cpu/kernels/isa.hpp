#pragma once
// Which instruction set the CPU kernel's inner loops run on, chosen at run time.
//
// A consumer that compiles for baseline x86-64 (no -march flag) still gets the AVX2+FMA or
// AVX-512 micro-kernels: they are compiled with per-function target attributes (see avx2.hpp)
// and picked here by asking the CPU (__builtin_cpu_supports, which also checks that the OS saves
// the wide registers). On aarch64 NEON is part of the base ISA. The generic kernels (plain C++)
// run everywhere and are the oracle the others are tested against.
//
// Forcing a path: CpuOptions::isa, else the DILATED_ATTENTION_CPU_ISA environment variable
// (generic | avx2 | avx512 | neon | auto). A forced path this build or this CPU cannot run is
// rejected with std::invalid_argument, never silently replaced.

#include <cstdlib>
#include <stdexcept>
#include <string>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define DILATED_ATTENTION_X86_KERNELS 1
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#define DILATED_ATTENTION_NEON_KERNELS 1
#endif

namespace dilated_attention {

// automatic: the best path this CPU runs (or DILATED_ATTENTION_CPU_ISA when set).
enum class CpuIsa { automatic, generic, avx2, avx512, neon };

inline const char* to_string(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::automatic: return "auto";
    case CpuIsa::generic: return "generic";
    case CpuIsa::avx2: return "avx2";
    case CpuIsa::avx512: return "avx512";
    case CpuIsa::neon: return "neon";
  }
  return "unknown";
}

namespace cpu {

// Whether this build contains the kernels of `isa` (a property of the compiler and target).
inline bool isa_compiled(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::generic: return true;
#if defined(DILATED_ATTENTION_X86_KERNELS)
    case CpuIsa::avx2:
    case CpuIsa::avx512: return true;
#endif
#if defined(DILATED_ATTENTION_NEON_KERNELS)
    case CpuIsa::neon: return true;
#endif
    default: return false;
  }
}

// Whether this build contains the kernels of `isa` and this CPU can run them.
inline bool isa_supported(CpuIsa isa) {
  if (!isa_compiled(isa)) return false;
  switch (isa) {
    case CpuIsa::generic: return true;
#if defined(DILATED_ATTENTION_X86_KERNELS)
    case CpuIsa::avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case CpuIsa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
             __builtin_cpu_supports("fma");
#endif
#if defined(DILATED_ATTENTION_NEON_KERNELS)
    case CpuIsa::neon: return true;
#endif
    default: return false;
  }
}

// The fastest path this CPU runs.
inline CpuIsa best_isa() {
  for (CpuIsa isa : {CpuIsa::avx512, CpuIsa::avx2, CpuIsa::neon})
    if (isa_supported(isa)) return isa;
  return CpuIsa::generic;
}

// `text` as a CpuIsa ("auto" and "" are automatic); throws std::invalid_argument otherwise.
inline CpuIsa parse_isa(const std::string& text, const char* what) {
  for (CpuIsa isa :
       {CpuIsa::automatic, CpuIsa::generic, CpuIsa::avx2, CpuIsa::avx512, CpuIsa::neon})
    if (text == to_string(isa)) return isa;
  if (text.empty()) return CpuIsa::automatic;
  throw std::invalid_argument(std::string("dilated_attention: ") + what + " = '" + text +
                              "': must be one of auto, generic, avx2, avx512, neon");
}

// The path an entry point will run: `requested` unless automatic, then the environment variable
// DILATED_ATTENTION_CPU_ISA when set, then best_isa(). Throws std::invalid_argument, before any
// work, for a name it does not know or a path this build or CPU cannot run.
inline CpuIsa resolve_isa(CpuIsa requested) {
  const char* what = "CpuOptions.isa";
  if (requested == CpuIsa::automatic) {
    const char* text = std::getenv("DILATED_ATTENTION_CPU_ISA");
    if (text == nullptr) return best_isa();
    what = "DILATED_ATTENTION_CPU_ISA";
    requested = parse_isa(text, what);
    if (requested == CpuIsa::automatic) return best_isa();
  }
  const int value = static_cast<int>(requested);
  if (value < 0 || value > static_cast<int>(CpuIsa::neon))
    throw std::invalid_argument("dilated_attention: CpuOptions.isa = " +
                                std::to_string(static_cast<int>(requested)) +
                                ": not a CpuIsa value");
  if (!isa_supported(requested))
    throw std::invalid_argument(std::string("dilated_attention: ") + what + " = " +
                                to_string(requested) + ": " +
                                (isa_compiled(requested) ? "this CPU cannot run it"
                                                         : "not compiled into this build") +
                                " (best here: " + to_string(best_isa()) + ")");
  return requested;
}

}  // namespace cpu
}  // namespace dilated_attention
