#include "server/proc_stats.h"

#include <unistd.h>

#include <fstream>
#include <iterator>
#include <sstream>

namespace da::server {

int64_t ProcStatusBytes(pid_t pid, const std::string& field) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field + ":", 0) == 0) return std::stoll(line.substr(field.size() + 1)) * 1024;
  }
  return -1;
}

double ProcessCpuSeconds(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  const std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  // The fields after the command name (which may hold spaces) start after its closing ')'.
  const size_t close = stat.rfind(')');
  if (close == std::string::npos) return -1;
  std::istringstream fields(stat.substr(close + 2));
  std::string field;
  double ticks = 0;
  int i = 3;  // The first field after the name is field 3; 14 and 15 are utime and stime.
  for (; i <= 15 && fields >> field; ++i) {
    if (i >= 14) ticks += std::stod(field);
  }
  return i == 16 ? ticks / static_cast<double>(sysconf(_SC_CLK_TCK)) : -1;
}

MachineCpu ReadMachineCpu() {
  std::ifstream in("/proc/stat");
  std::string label;
  // user nice system idle iowait irq softirq steal (guest time is already in user).
  double ticks[8] = {};
  if (!(in >> label) || label != "cpu") return {};
  for (double& field : ticks) {
    if (!(in >> field)) return {};
  }
  const double hz = static_cast<double>(sysconf(_SC_CLK_TCK));
  MachineCpu cpu;
  cpu.ok = true;
  cpu.idle_s = (ticks[3] + ticks[4]) / hz;
  cpu.softirq_s = ticks[6] / hz;
  for (const double field : ticks) cpu.total_s += field / hz;
  return cpu;
}

}  // namespace da::server
