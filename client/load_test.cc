#include "client/load.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>

#include "client/load_cli.h"
#include "client/load_mix.h"
#include "client/tensor_io.h"
#include "server/test_util.h"

namespace da::client {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// --- Percentiles ------------------------------------------------------------------------------

TEST(PercentileTest, NearestRankOnUnsortedValues) {
  // The classic nearest-rank example: 15, 20, 35, 40, 50 (given shuffled).
  const std::vector<double> values = {40, 15, 50, 35, 20};
  EXPECT_EQ(Percentile(values, 0), 15);
  EXPECT_EQ(Percentile(values, 5), 15);
  EXPECT_EQ(Percentile(values, 30), 20);
  EXPECT_EQ(Percentile(values, 40), 20);
  EXPECT_EQ(Percentile(values, 50), 35);
  EXPECT_EQ(Percentile(values, 100), 50);
}

TEST(PercentileTest, OneToHundred) {
  std::vector<double> values;
  for (int i = 100; i >= 1; --i) values.push_back(i);
  EXPECT_EQ(Percentile(values, 50), 50);
  EXPECT_EQ(Percentile(values, 90), 90);
  EXPECT_EQ(Percentile(values, 99), 99);
  EXPECT_EQ(Percentile(values, 99.5), 100);
}

TEST(PercentileTest, EmptyAndSingle) {
  EXPECT_EQ(Percentile({}, 50), 0);
  EXPECT_EQ(Percentile({7.5}, 0), 7.5);
  EXPECT_EQ(Percentile({7.5}, 99), 7.5);
}

TEST(PercentileTest, SummaryOfLatencies) {
  std::vector<double> latencies;
  for (int i = 1; i <= 1000; ++i) latencies.push_back(i * 0.5);
  const LatencyPercentiles summary = SummarizeLatencies(latencies);
  EXPECT_EQ(summary.p50_ms, 250);
  EXPECT_EQ(summary.p90_ms, 450);
  EXPECT_EQ(summary.p99_ms, 495);
  EXPECT_EQ(summary.max_ms, 500);
  EXPECT_DOUBLE_EQ(summary.mean_ms, 250.25);
}

// --- Mixes ------------------------------------------------------------------------------------

// Inputs are random, not zeros: most elements of each tensor differ from zero and from each other.
void ExpectRandomInputs(const RequestKind& kind) {
  for (const v1::Tensor* tensor :
       {&kind.request->query(), &kind.request->key(), &kind.request->value()}) {
    const std::string& data = tensor->data();
    const int64_t element_bytes = DTypeBytes(tensor->dtype());
    ASSERT_GT(element_bytes, 0) << kind.name;
    int64_t zeros = 0, repeats = 0;
    for (size_t at = 0; at + 2 * element_bytes <= data.size(); at += element_bytes) {
      zeros += std::all_of(data.begin() + at, data.begin() + at + element_bytes,
                           [](char c) { return c == 0; });
      repeats += std::memcmp(&data[at], &data[at + element_bytes], element_bytes) == 0;
    }
    const int64_t elements = static_cast<int64_t>(data.size()) / element_bytes;
    EXPECT_LT(zeros, elements / 100) << kind.name;
    EXPECT_LT(repeats, elements / 20) << kind.name;
  }
  EXPECT_NE(kind.request->query().data(), kind.request->key().data()) << kind.name;
}

TEST(LoadMixTest, SmallIsOneUnaryFp32Shape) {
  const std::vector<RequestKind> kinds = BuildMix(Mix::kSmall, false, 1);
  ASSERT_EQ(kinds.size(), 1u);
  const RequestKind& kind = kinds[0];
  EXPECT_FALSE(kind.stream);
  EXPECT_FALSE(kind.malformed());
  EXPECT_EQ(kind.request->query().dtype(), v1::DTYPE_FP32);
  EXPECT_THAT(kind.request->query().shape(), ElementsAre(1, 2048, 8, 64));
  EXPECT_THAT(kind.request->key().shape(), ElementsAre(1, 2048, 8, 64));
  EXPECT_EQ(kind.tokens, 2048);
  EXPECT_EQ(kind.request_bytes, 4 * 2048 * 8 * 64 * 4);
  ExpectRandomInputs(kind);
}

TEST(LoadMixTest, LargeIsOneStreamed64KTokenShape) {
  const std::vector<RequestKind> kinds = BuildMix(Mix::kLarge, false, 1);
  ASSERT_EQ(kinds.size(), 1u);
  EXPECT_TRUE(kinds[0].stream);
  EXPECT_THAT(kinds[0].request->query().shape(), ElementsAre(1, 65536, 8, 64));
  EXPECT_EQ(kinds[0].tokens, 65536);
}

TEST(LoadMixTest, MixedCoversTransportsDtypesCausalGqaAndOddLengths) {
  const std::vector<RequestKind> kinds = BuildMix(Mix::kMixed, false, 3);
  bool unary = false, stream = false, fp16 = false, bf16 = false, fp32 = false, causal = false;
  bool gqa = false, odd = false, grouped = false, batched = false, wider_output = false;
  int64_t smallest = INT64_MAX, largest = 0;
  for (const RequestKind& kind : kinds) {
    EXPECT_FALSE(kind.malformed()) << kind.name;
    const v1::AttendRequest& r = *kind.request;
    (kind.stream ? stream : unary) = true;
    fp16 |= r.query().dtype() == v1::DTYPE_FP16;
    bf16 |= r.query().dtype() == v1::DTYPE_BF16;
    fp32 |= r.query().dtype() == v1::DTYPE_FP32;
    causal |= r.spec().causal();
    grouped |= r.spec().combine_mode() == v1::COMBINE_MODE_GROUPED;
    gqa |= r.key().shape(2) < r.query().shape(2);
    odd |= r.query().shape(1) % 2 == 1;
    batched |= r.query().shape(0) > 1;
    wider_output |= r.output_dtype() == v1::DTYPE_FP32 && r.query().dtype() != v1::DTYPE_FP32;
    smallest = std::min(smallest, kind.tokens);
    largest = std::max(largest, kind.tokens);
    EXPECT_EQ(kind.tokens, r.query().shape(0) * r.query().shape(1)) << kind.name;
    ExpectRandomInputs(kind);
  }
  EXPECT_TRUE(unary && stream && fp16 && bf16 && fp32 && causal && gqa && odd && grouped &&
              batched && wider_output);
  EXPECT_LE(smallest, 1024);
  EXPECT_GE(largest, 16384);
}

TEST(LoadMixTest, MalformedKindsOnlyWhenAsked) {
  for (Mix mix : {Mix::kSmall, Mix::kMixed, Mix::kLarge}) {
    const std::vector<RequestKind> without = BuildMix(mix, false, 1);
    const std::vector<RequestKind> with = BuildMix(mix, true, 1);
    EXPECT_EQ(with.size(), without.size() + MalformedKinds(1).size());
    for (const RequestKind& kind : without) EXPECT_FALSE(kind.malformed()) << kind.name;
    int64_t malformed = 0;
    for (const RequestKind& kind : with) malformed += kind.malformed();
    EXPECT_EQ(malformed, static_cast<int64_t>(MalformedKinds(1).size()));
  }
}

TEST(LoadMixTest, InputsDependOnTheSeedOnly) {
  const std::vector<RequestKind> a = BuildMix(Mix::kMixed, true, 5);
  const std::vector<RequestKind> b = BuildMix(Mix::kMixed, true, 5);
  const std::vector<RequestKind> c = BuildMix(Mix::kMixed, true, 6);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].request->SerializeAsString(), b[i].request->SerializeAsString()) << a[i].name;
    EXPECT_NE(a[i].request->query().data(), c[i].request->query().data()) << a[i].name;
  }
}

TEST(LoadMixTest, MixNamesRoundTrip) {
  for (Mix mix : {Mix::kSmall, Mix::kMixed, Mix::kLarge}) EXPECT_EQ(*ParseMix(MixName(mix)), mix);
  const absl::StatusOr<Mix> bad = ParseMix("huge");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().message(), "--mix: 'huge' is not small, mixed or large");
}

TEST(KindPickerTest, DrawsTheMalformedFractionAndTheWeights) {
  const std::vector<RequestKind> kinds = BuildMix(Mix::kMixed, true, 1);
  const KindPicker picker(kinds, 0.1);
  std::mt19937_64 rng(42);
  std::vector<int64_t> counts(kinds.size());
  constexpr int kDraws = 200000;
  for (int i = 0; i < kDraws; ++i) ++counts[picker.Pick(rng)];
  double weight_sum = 0, malformed_draws = 0;
  int64_t fewest_malformed = INT64_MAX, most_malformed = 0;
  for (const RequestKind& kind : kinds) weight_sum += kind.malformed() ? 0 : kind.weight;
  for (size_t k = 0; k < kinds.size(); ++k) {
    if (kinds[k].malformed()) {
      malformed_draws += counts[k];
      fewest_malformed = std::min(fewest_malformed, counts[k]);
      most_malformed = std::max(most_malformed, counts[k]);
    } else {
      const double expected = 0.9 * kDraws * kinds[k].weight / weight_sum;
      EXPECT_NEAR(counts[k], expected, 0.05 * expected) << kinds[k].name;
    }
  }
  EXPECT_NEAR(malformed_draws / kDraws, 0.1, 0.005);
  // Taken in turn: every malformed kind equally often, to within one.
  EXPECT_GT(fewest_malformed, 0);
  EXPECT_LE(most_malformed - fewest_malformed, 1);
}

TEST(KindPickerTest, FewMalformedDrawsStillCoverEveryMalformedKind) {
  const std::vector<RequestKind> kinds = BuildMix(Mix::kSmall, true, 1);
  const KindPicker picker(kinds, 1);
  std::mt19937_64 rng(3);
  std::set<size_t> seen;
  for (size_t i = 0; i + 1 < kinds.size(); ++i) seen.insert(picker.Pick(rng));
  EXPECT_EQ(seen.size(), kinds.size() - 1);  // Every kind but the one well-formed kind.
}

TEST(KindPickerTest, WorkersStartOnEveryWellFormedKindInTurn) {
  const std::vector<RequestKind> kinds = BuildMix(Mix::kMixed, true, 1);
  const KindPicker picker(kinds, 0.5);
  std::set<std::string> first;
  for (int worker = 0; worker < 5; ++worker) {
    const RequestKind& kind = kinds[picker.First(worker)];
    EXPECT_FALSE(kind.malformed()) << kind.name;
    first.insert(kind.name);
  }
  EXPECT_EQ(first.size(), 5u);
  EXPECT_EQ(picker.First(5), picker.First(0));
}

TEST(KindPickerTest, ZeroAndOneFractions) {
  const std::vector<RequestKind> kinds = BuildMix(Mix::kSmall, true, 1);
  std::mt19937_64 rng(1);
  const KindPicker never(kinds, 0);
  const KindPicker always(kinds, 1);
  for (int i = 0; i < 1000; ++i) {
    EXPECT_FALSE(kinds[never.Pick(rng)].malformed());
    EXPECT_TRUE(kinds[always.Pick(rng)].malformed());
  }
}

// --- Against a real server --------------------------------------------------------------------

class LoadServerTest : public testing::Test {
 protected:
  void SetUp() override {
    server_ = server::testing::StartServer(server::testing::LoopbackOptions());
    ASSERT_NE(server_, nullptr);
    address_ = "127.0.0.1:" + std::to_string(server_->port());
    channel_ = MakeChannel(address_);
    client_ = std::make_unique<AttentionClient>(channel_);
  }

  std::unique_ptr<server::Server> server_;
  std::string address_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<AttentionClient> client_;
};

TEST_F(LoadServerTest, MalformedRequestsAreRefusedForTheirFault) {
  const std::vector<RequestKind> kinds = MalformedKinds(9);
  ASSERT_GE(kinds.size(), 9u);
  for (const RequestKind& kind : kinds) {
    v1::AttendResponse response;
    const grpc::Status status = SendKind(kind, *client_, {.timeout_ms = 30000}, -1, &response);
    EXPECT_EQ(status.error_code(), kind.expected_code)
        << kind.name << ": " << status.error_message();
    EXPECT_EQ(kind.expected_code, grpc::StatusCode::INVALID_ARGUMENT) << kind.name;
    EXPECT_THAT(status.error_message(), HasSubstr(kind.expected_message)) << kind.name;
    if (kind.fault != StreamFault::kNone) {
      EXPECT_THAT(status.error_message(), HasSubstr("block")) << kind.name;
    }
  }
}

TEST_F(LoadServerTest, WellFormedRequestsSucceedUnaryAndStreamed) {
  // Also the control of the test above: the malformed kinds' base shapes are served.
  for (int override : {-1, 0, 1}) {
    for (const RequestKind& kind : BuildMix(Mix::kMixed, false, 2)) {
      v1::AttendResponse response;
      grpc::Status status = SendKind(kind, *client_, {.timeout_ms = 60000}, override, &response);
      ASSERT_TRUE(status.ok()) << kind.name << ": " << status.error_message();
      status = CheckResponse(kind, response);
      EXPECT_TRUE(status.ok()) << kind.name << ": " << status.error_message();
    }
  }
}

TEST_F(LoadServerTest, CheckResponseRejectsAWrongOutput) {
  const RequestKind kind = BuildMix(Mix::kSmall, false, 1)[0];
  v1::AttendResponse response;
  ASSERT_TRUE(SendKind(kind, *client_, {.timeout_ms = 60000}, -1, &response).ok());
  response.mutable_output()->mutable_data()->pop_back();
  const grpc::Status status = CheckResponse(kind, response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INTERNAL);
  EXPECT_THAT(status.error_message(), HasSubstr("bytes; expected 4194304"));
}

// The mixed mix with 30% malformed requests over 2 channels against the test's server.
LoadOptions MixedRun(const std::string& server, int concurrency, double duration_s) {
  LoadOptions options;
  options.server = server;
  options.concurrency = concurrency;
  options.channels = 2;
  options.duration_s = duration_s;
  options.mix = Mix::kMixed;
  options.malformed_fraction = 0.3;
  return options;
}

TEST_F(LoadServerTest, RunLoadCountsEveryAnswerAsExpected) {
  const absl::StatusOr<LoadReport> report = RunLoad(MixedRun(address_, 4, 1.5));
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->unexpected_errors, 0) << report->ToText();
  EXPECT_GT(report->completed, 0);
  EXPECT_GT(report->expected_errors, 0);
  EXPECT_EQ(report->sent, report->completed + report->expected_errors);
  EXPECT_GE(report->elapsed_s, 1.5);
  EXPECT_GT(report->requests_per_s, 0);
  EXPECT_GT(report->tokens_per_s, report->requests_per_s);
  EXPECT_GT(report->latency.p50_ms, 0);
  EXPECT_LE(report->latency.p50_ms, report->latency.p90_ms);
  EXPECT_LE(report->latency.p99_ms, report->latency.max_ms);
  EXPECT_EQ(report->codes.at("OK").expected, report->completed);
  EXPECT_EQ(report->codes.at("INVALID_ARGUMENT").expected, report->expected_errors);
  EXPECT_EQ(report->kinds.size(), BuildMix(Mix::kMixed, true, 1).size());

  const nlohmann::json json = nlohmann::json::parse(report->ToJson());
  EXPECT_EQ(json["mix"], "mixed");
  EXPECT_EQ(json["concurrency"], 4);
  EXPECT_EQ(json["sent"], report->sent);
  EXPECT_EQ(json["unexpected_errors"], 0);
  EXPECT_EQ(json["codes"]["OK"]["unexpected"], 0);
  EXPECT_EQ(json["kinds"]["tiny-unary"]["expected_code"], "OK");
  EXPECT_EQ(json["kinds"]["stream-missing-block"]["expected_code"], "INVALID_ARGUMENT");
  EXPECT_EQ(json["max_request_bytes"], report->max_request_bytes);
  EXPECT_EQ(json["channels"], 2);
  EXPECT_EQ(json["connections_renewed"], 0);  // No age: the run keeps its first connections.
  for (const char* field : {"p50", "p90", "p99", "max", "mean"}) {
    EXPECT_TRUE(json["latency_ms"].contains(field)) << field;
  }
  EXPECT_THAT(report->ToText(), HasSubstr("unexpected errors   0"));
  const KindReport& tiny = report->kinds.at("tiny-unary");
  EXPECT_GT(tiny.ok, 0);
  EXPECT_GT(tiny.latency.p50_ms, 0);
  EXPECT_LE(tiny.latency.p99_ms, report->latency.max_ms);
  EXPECT_EQ(json["kinds"]["tiny-unary"]["latency_ms"]["p50"], tiny.latency.p50_ms);
  // Malformed kinds are taken in turn: each was sent as often as any other, to within one.
  int64_t fewest = INT64_MAX, most = 0;
  for (const auto& [name, kind] : report->kinds) {
    if (!kind.malformed) continue;
    fewest = std::min(fewest, kind.sent);
    most = std::max(most, kind.sent);
  }
  EXPECT_GT(most, 0);
  EXPECT_LE(most - fewest, 1);
}

TEST_F(LoadServerTest, ConnectionsPastTheirAgeAreRenewedWithEveryKindStillAnswered) {
  // Every kind, faulty streams (sent on the client's channel) included, goes on renewed
  // connections; test_load.py checks that a renewed connection reaches a replica added behind a
  // load balancer.
  LoadOptions options = MixedRun(address_, 2, 1.2);
  options.max_connection_age_ms = 150;
  const absl::StatusOr<LoadReport> report = RunLoad(options);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->unexpected_errors, 0) << report->ToText();
  EXPECT_GT(report->completed, 0);
  EXPECT_GT(report->expected_errors, 0);
  // Each of the 2 channels is renewed about every 135-150 ms while its worker calls: at least
  // 3 times each in 1.2 s (the mix's largest call takes well under 0.5 s here).
  EXPECT_GE(report->connections_renewed, 6) << report->ToText();
  const nlohmann::json json = nlohmann::json::parse(report->ToJson());
  EXPECT_EQ(json["max_connection_age_ms"], 150);
  EXPECT_EQ(json["connections_renewed"], report->connections_renewed);
  EXPECT_THAT(report->ToText(),
              HasSubstr(absl::StrCat("connections         2, renewed after about 150 ms: ",
                                     report->connections_renewed, " times")));
}

TEST(LoadRefusalTest, UnexpectedCodesCountUnlessExpectedUnderLoad) {
  // Every small request (16 MiB of q, k, v and output) is over this server's request limit.
  server::ServerOptions server_options = server::testing::LoopbackOptions();
  server_options.max_request_bytes = 1 << 20;
  std::unique_ptr<server::Server> server = server::testing::StartServer(server_options);
  ASSERT_NE(server, nullptr);
  LoadOptions options;
  options.server = "127.0.0.1:" + std::to_string(server->port());
  options.concurrency = 2;
  options.duration_s = 0.3;

  absl::StatusOr<LoadReport> report = RunLoad(options);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_GT(report->sent, 0);
  EXPECT_EQ(report->unexpected_errors, report->sent);
  EXPECT_EQ(report->completed, 0);
  EXPECT_EQ(report->codes.at("RESOURCE_EXHAUSTED").unexpected, report->sent);
  ASSERT_FALSE(report->unexpected_samples.empty());
  EXPECT_EQ(report->unexpected_samples[0].kind, "small-unary");
  EXPECT_EQ(report->unexpected_samples[0].code, "RESOURCE_EXHAUSTED");
  EXPECT_THAT(report->unexpected_samples[0].message, HasSubstr("--max-request-bytes"));

  options.expect_codes = {grpc::StatusCode::RESOURCE_EXHAUSTED};
  report = RunLoad(options);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->unexpected_errors, 0);
  EXPECT_EQ(report->expected_errors, report->sent);
  EXPECT_THAT(nlohmann::json::parse(report->ToJson())["load_codes"],
              ElementsAre("RESOURCE_EXHAUSTED"));
}

TEST(LoadRefusalTest, NoServerIsUnavailable) {
  LoadOptions options;
  options.server = "127.0.0.1:1";  // Nothing listens on port 1 of a test machine.
  const absl::StatusOr<LoadReport> report = RunLoad(options);
  ASSERT_FALSE(report.ok());
  EXPECT_EQ(report.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(report.status().message(), HasSubstr("server 127.0.0.1:1 does not answer"));
}

// --- Options and flags ------------------------------------------------------------------------

TEST(LoadOptionsTest, ChecksNameTheFlagTheValueAndTheLimit) {
  const std::vector<std::pair<std::function<void(LoadOptions&)>, std::string>> cases = {
      {[](LoadOptions& o) { o.concurrency = 0; }, "--concurrency is 0; must be in [1, 4096]"},
      {[](LoadOptions& o) { o.channels = 3; },
       "--channels is 3; must be in [1, --concurrency = 1]"},
      {[](LoadOptions& o) { o.duration_s = 0; }, "--duration-s is 0; must be > 0"},
      {[](LoadOptions& o) { o.warmup_s = -1; }, "--warmup-s is -1; must be >= 0"},
      {[](LoadOptions& o) { o.duration_s = std::nan(""); }, "--duration-s is nan; must be > 0"},
      {[](LoadOptions& o) { o.warmup_s = HUGE_VAL; }, "--warmup-s is inf; must be >= 0"},
      // Past a year the run's end overflows the clock: the run would end at once, sending nothing.
      {[](LoadOptions& o) { o.duration_s = 1e10; },
       "--duration-s is 1e+10; must be at most 31536000 (a year)"},
      {[](LoadOptions& o) { o.warmup_s = 4e7; },
       "--warmup-s is 4e+07; must be at most 31536000 (a year)"},
      {[](LoadOptions& o) { o.malformed_fraction = 1.5; },
       "--malformed-fraction is 1.5; must be in [0, 1]"},
      {[](LoadOptions& o) { o.deadline_ms = -5; }, "--deadline-ms is -5; must be >= 0 (0: none)"},
      {[](LoadOptions& o) { o.deadline_ms = int64_t{1} << 50; },
       "--deadline-ms is 1125899906842624; must be at most 31536000000 (a year; 0: none)"},
      {[](LoadOptions& o) { o.max_connection_age_ms = -1; },
       "--max-connection-age-ms is -1; must be in [0, 31536000000] (a year; 0: never renew)"},
      {[](LoadOptions& o) { o.max_connection_age_ms = int64_t{1} << 40; },
       "--max-connection-age-ms is 1099511627776; must be in [0, 31536000000] (a year; 0: never "
       "renew)"},
      {[](LoadOptions& o) { o.server = ""; }, "--server must not be empty"},
  };
  for (const auto& [mutate, message] : cases) {
    LoadOptions options;
    mutate(options);
    const absl::Status status = options.Check();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << message;
    EXPECT_EQ(status.message(), message);
    EXPECT_EQ(RunLoad(options).status().message(), message);
  }
  EXPECT_TRUE(LoadOptions().Check().ok());
}

TEST(LoadOptionsTest, DeadlineMakesDeadlineExceededExpected) {
  LoadOptions options;
  EXPECT_TRUE(options.LoadCodes().empty());
  options.deadline_ms = 100;
  EXPECT_THAT(options.LoadCodes(), ElementsAre(grpc::StatusCode::DEADLINE_EXCEEDED));
}

TEST(LoadFlagsTest, ParsesMixTransportAndExpectedCodes) {
  LoadFlags flags;
  flags.mix = "mixed";
  flags.transport = "stream";
  flags.expect_codes = "RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED";
  flags.seed = 7;
  absl::StatusOr<LoadOptions> options = flags.ToOptions();
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_EQ(options->mix, Mix::kMixed);
  EXPECT_EQ(options->stream_override, 1);
  EXPECT_EQ(options->seed, 7u);
  EXPECT_THAT(options->expect_codes, ElementsAre(grpc::StatusCode::DEADLINE_EXCEEDED,
                                                 grpc::StatusCode::RESOURCE_EXHAUSTED));

  flags.expect_codes = "RESOURCE_EXHAUSTD";
  EXPECT_EQ(flags.ToOptions().status().message(),
            "--expect-codes: 'RESOURCE_EXHAUSTD' is not a gRPC status code name (e.g. "
            "RESOURCE_EXHAUSTED)");
  flags.expect_codes = "";
  flags.transport = "carrier-pigeon";
  EXPECT_EQ(flags.ToOptions().status().message(),
            "--transport: 'carrier-pigeon' is not auto, unary or stream");
}

}  // namespace
}  // namespace da::client
