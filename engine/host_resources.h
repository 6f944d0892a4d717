// What this process may use of the machine: CPUs and memory, as a container runtime limits them.
// A pod with a 4-CPU limit on a 64-core node must run 4 compute threads, not 64; with an 8 GiB
// limit its budget comes from 8 GiB, not the node's RAM.
//
//   const HostResources& host = HostResourcesOfThisProcess();
//   spdlog::info("{} compute threads ({})", host.cpus, host.cpus_from);
//
// CPUs: the affinity mask (taskset, cpuset), lowered to the CFS quota rounded up (cgroup v2
// cpu.max, v1 cpu.cfs_quota_us / cpu.cfs_period_us). Memory: physical memory, lowered to the
// cgroup limit (v2 memory.max, v1 memory.limit_in_bytes). The cgroup is the one /proc/self/cgroup
// names, under /sys/fs/cgroup (or that mount itself, as in a container with its own cgroup
// namespace); for v2 the tightest limit of it and its ancestors counts.
#pragma once

#include <cstdint>
#include <string>

namespace da::engine {

struct HostResources {
  int cpus = 1;              // Compute threads to run when none are asked for.
  std::string cpus_from;     // "affinity mask of 8 CPUs", "cgroup cpu.max quota 4 CPUs (...)".
  int64_t memory_bytes = 0;  // What this process may use.
  std::string memory_from;   // "physical memory", "cgroup memory.max (/sys/fs/cgroup/...)".
};

// Reads the files under root ("/" for the real ones; a test's directory in tests), with the
// affinity mask's CPU count and the physical memory given.
HostResources ReadHostResources(const std::string& root, int affinity_cpus,
                                int64_t physical_memory_bytes);

// This process's, read once (sched_getaffinity, sysconf and the files under the root, "/" unless
// SetHostResourcesRoot said otherwise).
const HostResources& HostResourcesOfThisProcess();

// Bytes that count against this process's memory limit without being its own allocations (a
// memory-backed /dev/shm in its pod, a sidecar under the same limit) taken off memory_bytes, and
// said in memory_from; more than the memory leaves memory_bytes 0, which the caller refuses.
HostResources LessMemoryElsewhere(HostResources host, int64_t elsewhere_bytes);

// What HostResourcesOfThisProcess takes off with LessMemoryElsewhere (da-server
// --memory-elsewhere-bytes); only before its first call.
void SetMemoryElsewhere(int64_t bytes);

// Where HostResourcesOfThisProcess reads /proc and /sys from (da-server --resources-root, for
// tests); only before its first call.
void SetHostResourcesRoot(const std::string& root);

}  // namespace da::engine
