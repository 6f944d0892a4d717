// What Linux's /proc says about a process, for tests and benchmarks that watch a server.
//
//   int64_t peak = ProcStatusBytes(pid, "VmHWM");   // peak RSS, bytes
//   double cpu = ProcessCpuSeconds(pid);           // user + system, all threads
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>

namespace da::server {

// A field of /proc/<pid>/status in bytes (e.g. "VmHWM", "VmRSS"); -1 when unreadable.
int64_t ProcStatusBytes(pid_t pid, const std::string& field);

// CPU seconds (user and system, all threads) process `pid` has used so far; -1 when unreadable.
double ProcessCpuSeconds(pid_t pid);

}  // namespace da::server
