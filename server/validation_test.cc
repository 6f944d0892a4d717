// Every request-validation rule, end to end: a unary Attend on a real server returns
// INVALID_ARGUMENT with a message naming the field (and the offending value).
#include <gtest/gtest.h>

#include <functional>
#include <limits>
#include <random>
#include <string>

#include "client/attention_client.h"
#include "server/server.h"
#include "server/test_util.h"

namespace da::server {
namespace {

struct Rule {
  std::string name;
  std::function<void(v1::AttendRequest*)> break_request;
  std::vector<std::string> message_parts;  // Each must appear in the error message.
};

// Keeps test listings (and so ctest's names) readable and stable.
void PrintTo(const Rule& rule, std::ostream* os) { *os << rule.name; }

void SetShape(v1::Tensor* tensor, std::vector<int64_t> shape) {
  tensor->clear_shape();
  for (int64_t dim : shape) tensor->add_shape(dim);
}

// A valid request is fp32 [1, 64, 4, 16] for q, k, v with patterns (16, 1), (32, 2).
std::vector<Rule> Rules() {
  return {
      {"query_rank",
       [](v1::AttendRequest* r) {
         SetShape(r->mutable_query(), {64, 4, 16});
       },
       {"query.shape", "rank 3"}},
      {"key_rank",
       [](v1::AttendRequest* r) {
         SetShape(r->mutable_key(), {1, 64, 4, 16, 1});
       },
       {"key.shape", "rank 5"}},
      {"value_rank",
       [](v1::AttendRequest* r) { r->mutable_value()->clear_shape(); },
       {"value.shape", "rank 0"}},
      {"dtype_unspecified",
       [](v1::AttendRequest* r) { r->mutable_query()->clear_dtype(); },
       {"query.dtype", "DTYPE_UNSPECIFIED"}},
      {"dtype_unknown",
       [](v1::AttendRequest* r) { r->mutable_key()->set_dtype(static_cast<v1::DType>(42)); },
       {"key.dtype", "42"}},
      {"dtype_mismatch",
       [](v1::AttendRequest* r) { r->mutable_value()->set_dtype(v1::DTYPE_FP16); },
       {"value.dtype", "DTYPE_FP16"}},
      {"batch_mismatch",
       [](v1::AttendRequest* r) {
         SetShape(r->mutable_key(), {2, 32, 4, 16});  // Same byte count, other batch.
       },
       {"key.shape batch", "2"}},
      {"seq_mismatch",
       [](v1::AttendRequest* r) {
         SetShape(r->mutable_value(), {1, 32, 8, 16});
       },
       {"value.shape seq", "32"}},
      {"head_dim_mismatch",
       [](v1::AttendRequest* r) {
         SetShape(r->mutable_key(), {1, 64, 8, 8});
       },
       {"key.shape head_dim", "8"}},
      {"kv_heads_do_not_divide_heads",
       [](v1::AttendRequest* r) {
         // 3 kv heads of head_dim 16 and seq 64: 3072 elements; the data is resized to match.
         for (v1::Tensor* t : {r->mutable_key(), r->mutable_value()}) {
           SetShape(t, {1, 64, 3, 16});
           t->mutable_data()->resize(64 * 3 * 16 * 4);
         }
       },
       {"heads", "3", "4"}},
      {"value_heads_differ_from_key_heads",
       [](v1::AttendRequest* r) {
         SetShape(r->mutable_value(), {1, 64, 2, 16});
         r->mutable_value()->mutable_data()->resize(64 * 2 * 16 * 4);
       },
       {"value.shape heads", "2"}},
      {"no_pattern",
       [](v1::AttendRequest* r) {
         r->mutable_spec()->clear_segment_lengths();
         r->mutable_spec()->clear_dilation_rates();
       },
       {"spec.segment_lengths", "at least one"}},
      {"unequal_list_lengths",
       [](v1::AttendRequest* r) { r->mutable_spec()->add_segment_lengths(64); },
       {"spec.segment_lengths", "spec.dilation_rates", "3", "2"}},
      {"segment_length_zero",
       [](v1::AttendRequest* r) { r->mutable_spec()->set_segment_lengths(0, 0); },
       {"spec.segment_lengths[0]", "0"}},
      {"dilation_zero",
       [](v1::AttendRequest* r) { r->mutable_spec()->set_dilation_rates(1, 0); },
       {"spec.dilation_rates[1]", "0"}},
      {"dilation_above_segment_length",
       [](v1::AttendRequest* r) { r->mutable_spec()->set_dilation_rates(0, 17); },
       {"spec.dilation_rates[0]", "17", "16"}},
      {"query_bytes_wrong",
       [](v1::AttendRequest* r) { r->mutable_query()->mutable_data()->resize(100); },
       {"query.data", "100", "16384"}},
      {"value_bytes_wrong",
       [](v1::AttendRequest* r) { r->mutable_value()->mutable_data()->append("xy"); },
       {"value.data", "16386"}},
      {"seq_len_zero",
       [](v1::AttendRequest* r) {
         for (v1::Tensor* t : {r->mutable_query(), r->mutable_key(), r->mutable_value()}) {
           SetShape(t, {1, 0, 4, 16});
           t->clear_data();
         }
       },
       {"query.shape seq", "0", ">= 1"}},
      {"combine_mode_unknown",
       [](v1::AttendRequest* r) {
         r->mutable_spec()->set_combine_mode(static_cast<v1::CombineMode>(9));
       },
       {"spec.combine_mode", "9"}},
      {"softmax_scale_not_finite",
       [](v1::AttendRequest* r) {
         r->mutable_spec()->set_softmax_scale(std::numeric_limits<double>::infinity());
       },
       {"spec.softmax_scale", "inf"}},
  };
}

class ValidationTest : public ::testing::TestWithParam<Rule> {
 protected:
  static void SetUpTestSuite() {
    server_ = testing::StartServer(testing::LoopbackOptions()).release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  static Server* server_;
};

Server* ValidationTest::server_ = nullptr;

TEST_P(ValidationTest, UnaryIsInvalidArgumentNamingTheField) {
  ASSERT_NE(server_, nullptr);
  client::AttentionClient client(testing::ChannelTo(server_->port()));
  std::mt19937 rng(std::random_device{}());
  v1::AttendRequest request = testing::RandomRequest({}, rng);

  // The untouched request is valid: each case fails for its own reason only.
  v1::AttendResponse response;
  ASSERT_TRUE(client.Attend(request, &response).ok());

  GetParam().break_request(&request);
  grpc::Status status = client.Attend(request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  for (const std::string& part : GetParam().message_parts) {
    EXPECT_NE(status.error_message().find(part), std::string::npos)
        << "'" << part << "' missing from: " << status.error_message();
  }
}

INSTANTIATE_TEST_SUITE_P(Rules, ValidationTest, ::testing::ValuesIn(Rules()),
                         [](const ::testing::TestParamInfo<Rule>& info) {
                           return info.param.name;
                         });

}  // namespace
}  // namespace da::server
