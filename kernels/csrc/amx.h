// Whether this process may use the AMX tiles (quant_linear_a8.cpp, dense_linear.cpp).

#pragma once

#if defined(__linux__) && defined(__AMX_TILE__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace tandem {

// Linux gives a thread the AMX tile data (8 KB more per thread to save on a context switch) only
// once the process asks; a kernel without it, a VM that hides AMX or a build without AMX says no,
// and the callers keep their other path.
inline bool amx_tiles_granted() {
#if defined(__linux__) && defined(__AMX_TILE__)
  static const bool ok = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

}  // namespace tandem
