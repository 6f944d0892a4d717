#include "server/malloc_tuning.h"

#include <malloc.h>

namespace da::server {

bool KeepFreedMessageMemory() {
  // Fixed thresholds also turn off glibc's dynamic threshold, which would otherwise settle on
  // the size of the last large free and trim at twice that.
  const bool mmap_set = mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1;
  const bool trim_set = mallopt(M_TRIM_THRESHOLD, static_cast<int>(kKeptFreeBytes)) == 1;
  return mmap_set && trim_set;
}

}  // namespace da::server
