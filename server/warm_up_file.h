// The --warmup file of da-server: the shapes whose plans are built before readiness turns
// SERVING. A JSON array of objects, one per shape:
//
//   [{"batch": 1, "seq_len": 4096, "heads": 8, "kv_heads": 8, "head_dim": 64, "dtype": "fp32",
//     "segments": [2048, 4096], "dilations": [1, 2], "causal": false, "mode": "longnet",
//     "precision": "auto"}]
//
// Required: batch, seq_len, heads, head_dim, segments, dilations. Optional, with defaults:
// kv_heads (= heads), dtype ("fp32"; or "fp16", "bf16"), causal (false), mode ("longnet" or
// "grouped"), precision ("auto"; or "fp32", "bf16", "fp16", "fp8"). Any other key is an error.
//
//   DA_ASSIGN_OR_RETURN(std::vector<WarmUpShape> shapes, ReadWarmUpFile("warmup.json"));
//
// Errors are INVALID_ARGUMENT naming the entry (counted from 0) and the field ("entry 2:
// \"seq_len\" is \"4k\"; expected an integer"), or NOT_FOUND when the file cannot be read; they do
// not repeat the path. Values are only checked for type here; ranges are the engine's
// (Engine::WarmUp).
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/warm_up.h"

namespace da::server {

absl::StatusOr<std::vector<WarmUpShape>> ParseWarmUpJson(const std::string& text);
absl::StatusOr<std::vector<WarmUpShape>> ReadWarmUpFile(const std::string& path);

}  // namespace da::server
