// The problem flags the benchmarks share: shape, dilation patterns, combine mode and causal.
//
//   struct Options : ProblemFlags { int repeat = 5; };
//   Options o;
//   o.AddTo(app);
//   CLI11_PARSE(app, argc, argv);
//   absl::StatusOr<engine::AttentionSpec> spec = o.ResolveSpec();  // also fills kv_heads
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "engine/attention_spec.h"

namespace da::bench {

struct ProblemFlags {
  int64_t batch = 1, seq_len = 8192, heads = 8, kv_heads = 0, head_dim = 64;
  std::vector<int64_t> segments{2048}, dilations{1};
  std::string mode = "longnet";
  bool causal = false;

  void AddTo(CLI::App& app) {
    app.add_option("--batch", batch)->check(CLI::PositiveNumber);
    app.add_option("--seq-len", seq_len)->check(CLI::PositiveNumber);
    app.add_option("--heads", heads)->check(CLI::PositiveNumber);
    app.add_option("--kv-heads", kv_heads, "0: equal to --heads");
    app.add_option("--head-dim", head_dim)->check(CLI::PositiveNumber);
    app.add_option("--segments", segments)->delimiter(',');
    app.add_option("--dilations", dilations)->delimiter(',');
    app.add_option("--mode", mode)->check(CLI::IsMember({"longnet", "grouped"}));
    app.add_flag("--causal", causal);
  }

  // After parsing: kv_heads 0 becomes heads; the patterns, causal flag and mode as a spec
  // (precision and shard policy left to the caller). INVALID_ARGUMENT naming both counts when
  // --segments and --dilations differ in length.
  absl::StatusOr<engine::AttentionSpec> ResolveSpec() {
    if (kv_heads == 0) kv_heads = heads;
    if (segments.size() != dilations.size()) {
      return absl::InvalidArgumentError(absl::StrCat("--segments has ", segments.size(),
                                                     " values, --dilations ", dilations.size(),
                                                     "; they must match"));
    }
    engine::AttentionSpec spec;
    for (size_t i = 0; i < segments.size(); ++i)
      spec.patterns.push_back({segments[i], dilations[i]});
    spec.causal = causal;
    spec.mode = mode == "grouped" ? engine::CombineMode::kGrouped : engine::CombineMode::kLongNet;
    return spec;
  }
};

}  // namespace da::bench
