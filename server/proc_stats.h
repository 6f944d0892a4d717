// What Linux's /proc says about a process, for tests and benchmarks that watch a server.
//
//   int64_t peak = ProcStatusBytes(pid, "VmHWM");   // peak RSS, bytes
//   double cpu = ProcessCpuSeconds(pid);           // user + system, all threads
//   MachineCpu before = ReadMachineCpu();           // the whole machine, from /proc/stat
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>

namespace da::server {

// A field of /proc/<pid>/status in bytes (e.g. "VmHWM", "VmRSS"); -1 when unreadable.
int64_t ProcStatusBytes(pid_t pid, const std::string& field);

// CPU seconds (user and system, all threads) process `pid` has used so far; -1 when unreadable.
double ProcessCpuSeconds(pid_t pid);

// CPU seconds of the whole machine so far, summed over its CPUs (/proc/stat's "cpu" line, in
// 10 ms ticks): idle (idle and iowait), softirq (interrupt work such as loopback TCP's receive
// path, which is charged to no process), and everything (every field). ok is false when
// unreadable.
struct MachineCpu {
  bool ok = false;
  double idle_s = 0;
  double softirq_s = 0;
  double total_s = 0;
};
MachineCpu ReadMachineCpu();

}  // namespace da::server
