#include "server/conversion.h"

#include <gtest/gtest.h>

namespace da::server {
namespace {

TEST(ConversionTest, DTypesRoundTrip) {
  for (v1::DType dtype : {v1::DTYPE_FP32, v1::DTYPE_FP16, v1::DTYPE_BF16}) {
    absl::StatusOr<engine::DType> converted = DTypeFromProto(dtype, "query.dtype");
    ASSERT_TRUE(converted.ok()) << converted.status();
    EXPECT_EQ(DTypeToProto(*converted), dtype);
  }
  absl::StatusOr<engine::DType> unspecified = DTypeFromProto(v1::DTYPE_UNSPECIFIED, "x.dtype");
  EXPECT_EQ(unspecified.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(unspecified.status().message().find("x.dtype"), std::string::npos);
}

TEST(ConversionTest, SpecDefaultsAndFields) {
  v1::AttentionSpec proto;
  proto.add_segment_lengths(2048);
  proto.add_dilation_rates(1);
  proto.add_segment_lengths(4096);
  proto.add_dilation_rates(2);
  absl::StatusOr<engine::AttentionSpec> spec = SpecFromProto(proto);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->PatternsToString(), "(2048,1),(4096,2)");
  EXPECT_EQ(spec->mode, engine::CombineMode::kLongNet);  // COMBINE_MODE_UNSPECIFIED.
  EXPECT_EQ(spec->precision, engine::Precision::kAuto);
  EXPECT_EQ(spec->shard_policy, engine::ShardPolicy::kAuto);
  EXPECT_FALSE(spec->softmax_scale.has_value());
  EXPECT_FALSE(spec->causal);

  proto.set_causal(true);
  proto.set_softmax_scale(0.25);
  proto.set_combine_mode(v1::COMBINE_MODE_GROUPED);
  proto.set_precision(v1::PRECISION_BF16);
  proto.set_shard_policy(v1::SHARD_POLICY_HEADS);
  spec = SpecFromProto(proto);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_TRUE(spec->causal);
  EXPECT_EQ(spec->softmax_scale, 0.25);
  EXPECT_EQ(spec->mode, engine::CombineMode::kGrouped);
  EXPECT_EQ(spec->precision, engine::Precision::kBFloat16);
  EXPECT_EQ(spec->shard_policy, engine::ShardPolicy::kHeads);
}

// Millions of patterns fit one message; they are refused before any is copied, and a spec's
// log text stays a line however many it has.
TEST(ConversionTest, TooManyPatternsAreRefusedBeforeTheSpecIsBuilt) {
  v1::AttentionSpec proto;
  for (int i = 0; i < 100000; ++i) {
    proto.add_segment_lengths(1);
    proto.add_dilation_rates(1);
  }
  const absl::StatusOr<engine::AttentionSpec> refused = SpecFromProto(proto);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(refused.status().message(), "spec.segment_lengths has 100000 patterns; at most 64");
  engine::AttentionSpec many;
  for (int i = 1; i <= 40; ++i) many.patterns.push_back({i, 1});
  EXPECT_EQ(many.PatternsToString(),
            "(1,1),(2,1),(3,1),(4,1),(5,1),(6,1),(7,1),(8,1),(9,1),(10,1),(11,1),(12,1),(13,1),"
            "(14,1),(15,1),(16,1),...(40_in_all)");
}

// A timeout of 1e10 s (a Python client's "forever") reaches the server as a deadline past 2262,
// where gRPC's own conversion wraps system_clock into the past; it counts as none here.
TEST(ConversionTest, FarFutureDeadlinesAreNoneAndNearOnesKept) {
  using std::chrono::system_clock;
  EXPECT_EQ(ClientDeadline(gpr_inf_future(GPR_CLOCK_MONOTONIC)), system_clock::time_point::max());
  const gpr_timespec far = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                        gpr_time_from_seconds(10'000'000'000, GPR_TIMESPAN));
  EXPECT_EQ(ClientDeadline(far), system_clock::time_point::max());
  EXPECT_FALSE(SteadyDeadline(ClientDeadline(far)).has_value());
  const gpr_timespec near =
      gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_seconds(10, GPR_TIMESPAN));
  const double left =
      std::chrono::duration<double>(ClientDeadline(near) - system_clock::now()).count();
  EXPECT_NEAR(left, 10.0, 0.5);
  // A century ahead is still a deadline, in the future.
  const gpr_timespec century = gpr_time_add(
      gpr_now(GPR_CLOCK_REALTIME), gpr_time_from_seconds(int64_t{100} * 365 * 86400, GPR_TIMESPAN));
  EXPECT_GT(ClientDeadline(century), system_clock::now() + std::chrono::hours(24 * 365 * 99));
}

TEST(ConversionTest, TensorViewPointsIntoTheMessage) {
  v1::Tensor tensor;
  tensor.set_dtype(v1::DTYPE_FP16);
  for (int64_t dim : {2, 3, 4, 5}) tensor.add_shape(dim);
  tensor.mutable_data()->resize(2 * 3 * 4 * 5 * 2);
  absl::StatusOr<engine::TensorView> view = TensorViewFromProto(tensor, "query");
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_EQ(view->data, tensor.data().data());
  EXPECT_EQ(view->bytes, 240);
  EXPECT_EQ(view->dtype, engine::DType::kFloat16);
  EXPECT_EQ(view->shape.ToString(), "[2, 3, 4, 5]");
}

TEST(ConversionTest, HeaderKvHeadsZeroMeansHeads) {
  v1::StreamHeader header;
  header.set_dtype(v1::DTYPE_BF16);
  header.set_batch(1);
  header.set_seq_len(10);
  header.set_heads(6);
  header.set_head_dim(8);
  header.mutable_spec()->add_segment_lengths(4);
  header.mutable_spec()->add_dilation_rates(1);
  absl::StatusOr<StreamProblem> problem = ProblemFromHeader(header);
  ASSERT_TRUE(problem.ok()) << problem.status();
  EXPECT_EQ(problem->shape.kv_heads, 6);
  header.set_kv_heads(2);
  problem = ProblemFromHeader(header);
  ASSERT_TRUE(problem.ok()) << problem.status();
  EXPECT_EQ(problem->shape.kv_heads, 2);
  EXPECT_EQ(problem->out_dtype, engine::DType::kBFloat16);  // Unspecified: the inputs'.
}

TEST(ConversionTest, AnOutputDtypeIsTakenOrRefusedNamingItsField) {
  v1::AttendRequest request;
  for (v1::Tensor* t : {request.mutable_query(), request.mutable_key(), request.mutable_value()}) {
    t->set_dtype(v1::DTYPE_BF16);
    for (int64_t d : {1, 4, 2, 8}) t->add_shape(d);
  }
  request.mutable_spec()->add_segment_lengths(4);
  request.mutable_spec()->add_dilation_rates(1);
  absl::StatusOr<UnaryProblem> unary = ProblemFromRequest(request);
  ASSERT_TRUE(unary.ok()) << unary.status();
  EXPECT_EQ(unary->out_dtype, engine::DType::kBFloat16);
  request.set_output_dtype(v1::DTYPE_FP32);
  unary = ProblemFromRequest(request);
  ASSERT_TRUE(unary.ok()) << unary.status();
  EXPECT_EQ(unary->out_dtype, engine::DType::kFloat32);
  request.set_output_dtype(static_cast<v1::DType>(9));
  EXPECT_EQ(ProblemFromRequest(request).status().message(), "output_dtype has unknown value 9");

  v1::StreamHeader header;
  header.set_dtype(v1::DTYPE_FP16);
  header.set_output_dtype(v1::DTYPE_FP32);
  header.mutable_spec()->add_segment_lengths(4);
  header.mutable_spec()->add_dilation_rates(1);
  absl::StatusOr<StreamProblem> stream = ProblemFromHeader(header);
  ASSERT_TRUE(stream.ok()) << stream.status();
  EXPECT_EQ(stream->dtype, engine::DType::kFloat16);
  EXPECT_EQ(stream->out_dtype, engine::DType::kFloat32);
  header.set_output_dtype(static_cast<v1::DType>(9));
  EXPECT_EQ(ProblemFromHeader(header).status().message(),
            "header.output_dtype has unknown value 9");
  EXPECT_EQ(ProblemFromHeader(header, "shapes[3].dtype").status().message(),
            "shapes[3].output_dtype has unknown value 9");
}

TEST(ConversionTest, ExecutionInfoCarriesEveryField) {
  engine::ExecutionInfo info;
  info.precision_used = engine::Precision::kBFloat16;
  info.precision_reason = "allowed";
  info.shard_strategy = engine::ShardPolicy::kSequence;
  info.backend = "cpu";
  info.devices = {"cpu:0"};
  info.queue_time_us = 3;
  info.compute_time_us = 40;
  info.plan_build_time_us = 5;
  info.plan_cache_hit = true;  // Not the default, so a missing copy shows.
  info.fp8_scales.push_back({"cuda:1", {2.0f, 0.5f, 4.0f}, {224.0f, 896.0f, 112.0f}});
  v1::ExecutionInfo proto;
  ExecutionInfoToProto(info, "abc", 50, &proto);
  EXPECT_EQ(proto.request_id(), "abc");
  EXPECT_EQ(proto.precision_used(), v1::PRECISION_BF16);
  EXPECT_EQ(proto.precision_reason(), "allowed");
  EXPECT_EQ(proto.shard_strategy(), v1::SHARD_POLICY_SEQUENCE);
  EXPECT_EQ(proto.backend(), "cpu");
  ASSERT_EQ(proto.devices_size(), 1);
  EXPECT_EQ(proto.queue_time_us(), 3);
  EXPECT_EQ(proto.compute_time_us(), 40);
  EXPECT_EQ(proto.plan_build_time_us(), 5);
  EXPECT_EQ(proto.total_time_us(), 50);
  EXPECT_TRUE(proto.plan_cache_hit());
  ASSERT_EQ(proto.fp8_scales_size(), 1);
  const v1::Fp8Scales& scales = proto.fp8_scales(0);
  EXPECT_EQ(scales.device(), "cuda:1");
  EXPECT_EQ(scales.query_amax(), 2.0f);
  EXPECT_EQ(scales.key_amax(), 0.5f);
  EXPECT_EQ(scales.value_amax(), 4.0f);
  EXPECT_EQ(scales.query_scale(), 224.0f);
  EXPECT_EQ(scales.key_scale(), 896.0f);
  EXPECT_EQ(scales.value_scale(), 112.0f);
}

TEST(ConversionTest, PlanCacheStatsAndWarmUpResultCarryEveryField) {
  const engine::PlanCacheStats stats{.hits = 1,
                                     .misses = 2,
                                     .builds = 3,
                                     .evictions = 4,
                                     .bytes = 5,
                                     .entries = 6,
                                     .capacity_bytes = 7};
  v1::PlanCacheStats stats_proto;
  PlanCacheStatsToProto(stats, &stats_proto);
  EXPECT_EQ(stats_proto.hits(), 1);
  EXPECT_EQ(stats_proto.misses(), 2);
  EXPECT_EQ(stats_proto.builds(), 3);
  EXPECT_EQ(stats_proto.evictions(), 4);
  EXPECT_EQ(stats_proto.bytes(), 5);
  EXPECT_EQ(stats_proto.entries(), 6);
  EXPECT_EQ(stats_proto.capacity_bytes(), 7);

  const engine::WarmUpResult result{.already_warm = true,
                                    .plan_bytes = 8,
                                    .build_time_us = 9,
                                    .precision = engine::Precision::kBFloat16,
                                    .plan_key = "key",
                                    .plan_keys = {"key", "chunk key"}};
  v1::WarmUpResult result_proto;
  WarmUpResultToProto(result, &result_proto);
  EXPECT_TRUE(result_proto.already_warm());
  EXPECT_EQ(result_proto.plan_bytes(), 8);
  EXPECT_EQ(result_proto.build_time_us(), 9);
  EXPECT_EQ(result_proto.precision(), v1::PRECISION_BF16);
  EXPECT_EQ(result_proto.plan_key(), "key");
  ASSERT_EQ(result_proto.plan_keys_size(), 2);
  EXPECT_EQ(result_proto.plan_keys(0), "key");
  EXPECT_EQ(result_proto.plan_keys(1), "chunk key");
}

}  // namespace
}  // namespace da::server
