#pragma once
// The one place that maps a CpuIsa to its kernel set (generic.hpp's contract): with_kernels<Acc>
// calls f(K{}) with the kernels of `isa` for accumulator type Acc. The instruction-set kernels
// are float only; double accumulation always runs the generic kernels (plain C++, vectorised as
// far as the compiler's target allows), so `isa` changes nothing for double.

#include <stdexcept>
#include <type_traits>

#include "avx2.hpp"
#include "avx512.hpp"
#include "generic.hpp"
#include "isa.hpp"
#include "neon.hpp"

namespace dilated_attention::cpu::kernels {

template <class Acc, class F>
decltype(auto) with_kernels(CpuIsa isa, F&& f) {
  if constexpr (std::is_same_v<Acc, float>) {
    switch (isa) {
#if defined(DILATED_ATTENTION_X86_KERNELS)
      case CpuIsa::avx2: return f(Avx2{});
      case CpuIsa::avx512: return f(Avx512{});
#endif
#if defined(DILATED_ATTENTION_NEON_KERNELS)
      case CpuIsa::neon: return f(Neon{});
#endif
      case CpuIsa::generic: return f(Generic<Acc>{});
      default:
        throw std::invalid_argument(std::string("dilated_attention: no ") + to_string(isa) +
                                    " kernels in this build");
    }
  } else {
    static_cast<void>(isa);
    return f(Generic<Acc>{});
  }
}

}  // namespace dilated_attention::cpu::kernels
