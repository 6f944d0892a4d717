#include "engine/host_resources.h"

#include <sched.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace da::engine {
namespace {

namespace fs = std::filesystem;

std::optional<std::string> ReadFirstLine(const fs::path& path) {
  std::ifstream in(path);
  std::string line;
  if (!in || !std::getline(in, line)) return std::nullopt;
  return std::string(absl::StripAsciiWhitespace(line));
}

// A positive integer, or nullopt ("max", "-1", garbage).
std::optional<int64_t> PositiveNumber(const std::string& text) {
  int64_t value = 0;
  if (!absl::SimpleAtoi(text, &value) || value <= 0) return std::nullopt;
  return value;
}

// The cgroup directory of a hierarchy: mount + the path /proc/self/cgroup names, or the mount
// itself when that does not exist (a container's own cgroup namespace shows the host's path).
fs::path CgroupDir(const fs::path& mount, const std::string& path) {
  const fs::path named = mount / fs::path(path).relative_path();
  std::error_code error;
  if (!path.empty() && fs::is_directory(named, error)) return named;
  return mount;
}

struct CgroupPaths {
  std::optional<std::string> unified;  // v2: "0::<path>".
  std::optional<std::string> cpu;      // v1: the line whose controllers include cpu.
  std::optional<std::string> memory;   // v1: memory.
};

CgroupPaths ReadCgroupPaths(const fs::path& root) {
  CgroupPaths paths;
  std::ifstream in(root / "proc/self/cgroup");
  std::string line;
  while (std::getline(in, line)) {
    // hierarchy-id:controllers:path
    std::vector<std::string> fields = absl::StrSplit(line, absl::MaxSplits(':', 2));
    if (fields.size() != 3) continue;
    if (fields[0] == "0" && fields[1].empty()) paths.unified = fields[2];
    for (absl::string_view controller : absl::StrSplit(fields[1], ',')) {
      if (controller == "cpu") paths.cpu = fields[2];
      if (controller == "memory") paths.memory = fields[2];
    }
  }
  return paths;
}

// From dir up to mount (inclusive): the directories whose limits apply.
std::vector<fs::path> SelfAndAncestors(const fs::path& dir, const fs::path& mount) {
  std::vector<fs::path> dirs;
  fs::path at = dir;
  for (int depth = 0; depth < 64; ++depth) {
    dirs.push_back(at);
    if (at == mount || !at.has_parent_path() || at.parent_path() == at) break;
    at = at.parent_path();
  }
  return dirs;
}

struct Limit {
  double value = 0;
  std::string where;
};

// v2 cpu.max "quota period" or "max period": the quota in CPUs.
std::optional<Limit> CpuMax(const fs::path& dir) {
  const std::optional<std::string> line = ReadFirstLine(dir / "cpu.max");
  if (!line) return std::nullopt;
  std::vector<std::string> fields = absl::StrSplit(*line, ' ', absl::SkipEmpty());
  if (fields.size() != 2) return std::nullopt;
  const std::optional<int64_t> quota = PositiveNumber(fields[0]);
  const std::optional<int64_t> period = PositiveNumber(fields[1]);
  if (!quota || !period) return std::nullopt;
  return Limit{static_cast<double>(*quota) / static_cast<double>(*period),
               absl::StrCat((dir / "cpu.max").string(), " ", *line)};
}

// v1 cpu.cfs_quota_us (-1: none) over cpu.cfs_period_us.
std::optional<Limit> CfsQuota(const fs::path& dir) {
  const std::optional<std::string> quota_text = ReadFirstLine(dir / "cpu.cfs_quota_us");
  const std::optional<std::string> period_text = ReadFirstLine(dir / "cpu.cfs_period_us");
  if (!quota_text || !period_text) return std::nullopt;
  const std::optional<int64_t> quota = PositiveNumber(*quota_text);
  const std::optional<int64_t> period = PositiveNumber(*period_text);
  if (!quota || !period) return std::nullopt;
  return Limit{static_cast<double>(*quota) / static_cast<double>(*period),
               absl::StrCat((dir / "cpu.cfs_quota_us").string(), " ", *quota, " / ", *period)};
}

std::optional<Limit> MemoryFile(const fs::path& file) {
  const std::optional<std::string> line = ReadFirstLine(file);
  if (!line) return std::nullopt;
  const std::optional<int64_t> bytes = PositiveNumber(*line);
  if (!bytes) return std::nullopt;
  return Limit{static_cast<double>(*bytes), file.string()};
}

void KeepTighter(std::optional<Limit>& best, const std::optional<Limit>& candidate) {
  if (candidate && (!best || candidate->value < best->value)) best = candidate;
}

}  // namespace

HostResources ReadHostResources(const std::string& root_text, int affinity_cpus,
                                int64_t physical_memory_bytes) {
  const fs::path root(root_text.empty() ? "/" : root_text);
  const fs::path mount = root / "sys/fs/cgroup";
  const CgroupPaths paths = ReadCgroupPaths(root);
  std::optional<Limit> cpu, memory;
  if (paths.unified) {
    const fs::path dir = CgroupDir(mount, *paths.unified);
    for (const fs::path& at : SelfAndAncestors(dir, mount)) {
      KeepTighter(cpu, CpuMax(at));
      KeepTighter(memory, MemoryFile(at / "memory.max"));
    }
  }
  if (paths.cpu) {
    for (const char* name : {"cpu,cpuacct", "cpu"}) {
      if (fs::is_directory(mount / name)) {
        KeepTighter(cpu, CfsQuota(CgroupDir(mount / name, *paths.cpu)));
        break;
      }
    }
  }
  if (paths.memory) {
    KeepTighter(memory,
                MemoryFile(CgroupDir(mount / "memory", *paths.memory) / "memory.limit_in_bytes"));
  }

  HostResources host;
  const int affinity = std::max(affinity_cpus, 1);
  host.cpus = affinity;
  host.cpus_from = absl::StrCat("the affinity mask's ", affinity, " CPUs");
  if (cpu) {
    const int quota_cpus = std::max(1, static_cast<int>(std::ceil(cpu->value - 1e-9)));
    if (quota_cpus < affinity) {
      host.cpus = quota_cpus;
      host.cpus_from = absl::StrCat("the cgroup CPU quota of ", cpu->value, " CPUs rounded up (",
                                    cpu->where, "), below the affinity mask's ", affinity);
    }
  }
  host.memory_bytes = physical_memory_bytes;
  host.memory_from = absl::StrCat("physical memory (", physical_memory_bytes, " bytes)");
  if (memory && memory->value < static_cast<double>(physical_memory_bytes)) {
    host.memory_bytes = static_cast<int64_t>(memory->value);
    host.memory_from = absl::StrCat("the cgroup memory limit (", memory->where, ": ",
                                    host.memory_bytes, " bytes), below physical memory");
  }
  return host;
}

HostResources LessMemoryElsewhere(HostResources host, int64_t elsewhere_bytes) {
  if (elsewhere_bytes <= 0) return host;
  if (elsewhere_bytes >= host.memory_bytes) {
    host.memory_from =
        absl::StrCat(host.memory_from, ", all of it used elsewhere (", elsewhere_bytes, " bytes)");
    host.memory_bytes = 0;
    return host;
  }
  host.memory_bytes -= elsewhere_bytes;
  host.memory_from =
      absl::StrCat(host.memory_from, ", less ", elsewhere_bytes, " bytes used elsewhere");
  return host;
}

int64_t& MemoryElsewhere() {
  static int64_t bytes = 0;
  return bytes;
}

void SetMemoryElsewhere(int64_t bytes) { MemoryElsewhere() = bytes; }

std::string& ResourcesRoot() {
  static std::string root = "/";
  return root;
}

void SetHostResourcesRoot(const std::string& root) { ResourcesRoot() = root; }

const HostResources& HostResourcesOfThisProcess() {
  static const HostResources host = [] {
    cpu_set_t set;
    int affinity = 0;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) affinity = CPU_COUNT(&set);
    if (affinity <= 0)
      affinity = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    const long pages = sysconf(_SC_PHYS_PAGES);
    const long page_size = sysconf(_SC_PAGE_SIZE);
    const int64_t physical =
        pages > 0 && page_size > 0 ? static_cast<int64_t>(pages) * page_size : 0;
    return LessMemoryElsewhere(ReadHostResources(ResourcesRoot(), affinity, physical),
                               MemoryElsewhere());
  }();
  return host;
}

}  // namespace da::engine
