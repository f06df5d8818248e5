// ModelConfig: the committed test models parse; impossible or unsupported configs are
// InvalidArgument naming the key.
#include "lm2/runtime/model_config.h"

#include <catch2/catch.hpp>

#include "loader_test_util.h"

using lm2::runtime::ModelConfig;
using lm2::testing::json;

namespace {

json Lm2Json() {
  return json::parse(lm2::testing::ReadFile(lm2::testing::TestModel("tiny-lm2") + "/config.json"));
}

// Expects FromJson(j) to fail with InvalidArgument mentioning `needle`.
void ExpectRejected(const json& j, const std::string& needle) {
  auto c = ModelConfig::FromJson(j.dump());
  INFO(j.dump());
  REQUIRE_FALSE(c.ok());
  CHECK(c.status().IsInvalidArgument());
  INFO(c.status().ToString());
  CHECK(std::string(c.status().message()).find(needle) != std::string::npos);
}

}  // namespace

TEST_CASE("config: the three test models parse", "[config][loader]") {
  auto lm2 = ModelConfig::Load(lm2::testing::TestModel("tiny-lm2"));
  REQUIRE(lm2.ok());
  CHECK(lm2->vocab_size == 512);
  CHECK(lm2->hidden_size == 64);
  CHECK(lm2->intermediate_size == 160);
  CHECK(lm2->num_layers == 3);
  CHECK(lm2->num_heads == 4);
  CHECK(lm2->num_kv_heads == 2);
  CHECK(lm2->head_dim == 16);
  CHECK(lm2->rms_norm_eps == 1e-5);
  CHECK(lm2->rope_theta == 10000.0);
  CHECK(lm2->max_position_embeddings == 256);
  CHECK_FALSE(lm2->tie_word_embeddings);
  CHECK(lm2->memory_slots == 16);
  CHECK(lm2->memory_heads == 4);
  CHECK(lm2->memory_head_dim() == 16);
  CHECK(lm2->memory_layers == std::vector<int64_t>{0, 1, 2});
  CHECK(lm2->memory_segment_tokens == 16);
  CHECK_FALSE(lm2->memory_learned_init);
  CHECK(lm2->has_memory());

  auto vanilla = ModelConfig::Load(lm2::testing::TestModel("tiny-vanilla"));
  REQUIRE(vanilla.ok());
  CHECK_FALSE(vanilla->has_memory());
  CHECK(vanilla->memory_slots == 0);
  CHECK(vanilla->tie_word_embeddings);
  CHECK(vanilla->num_kv_heads == 1);
  CHECK_FALSE(vanilla->layer_has_memory(0));

  auto partial = ModelConfig::Load(lm2::testing::TestModel("tiny-partial"));
  REQUIRE(partial.ok());
  CHECK(partial->hidden_size == 48);
  CHECK(partial->head_dim == 8);
  CHECK(partial->memory_slots == 12);
  CHECK(partial->memory_layers == std::vector<int64_t>{1});
  CHECK(partial->memory_learned_init);
  CHECK_FALSE(partial->layer_has_memory(0));
  CHECK(partial->layer_has_memory(1));
  CHECK_FALSE(partial->layer_has_memory(2));
  CHECK(partial->memory_segment_tokens == 0);
}

TEST_CASE("config: defaults follow lm2ref", "[config][loader]") {
  json j = {{"architectures", {"LM2ForCausalLM"}}, {"vocab_size", 100}, {"hidden_size", 32},
            {"intermediate_size", 64}, {"num_hidden_layers", 2}, {"num_attention_heads", 4},
            {"memory_slots", 8}, {"eos_token_id", {7, 9}}};
  auto c = ModelConfig::FromJson(j.dump());
  REQUIRE(c.ok());
  CHECK(c->num_kv_heads == 4);
  CHECK(c->head_dim == 8);
  CHECK(c->memory_layers == std::vector<int64_t>{0, 1});
  CHECK(c->memory_heads == 1);
  CHECK(c->eos_token_id == 7);
  CHECK(c->bos_token_id == 1);
  CHECK(c->Validate().ok());

  json vanilla = j;
  vanilla.erase("architectures");
  vanilla.erase("memory_slots");
  vanilla["memory_layers"] = {0};  // ignored without memory_slots, as in lm2ref
  auto v = ModelConfig::FromJson(vanilla.dump());
  REQUIRE(v.ok());
  CHECK_FALSE(v->has_memory());
}

TEST_CASE("config: rejects unsupported and impossible configs", "[config][loader]") {
  const json base = Lm2Json();
  REQUIRE(ModelConfig::FromJson(base.dump()).ok());
  auto with = [&](const char* key, const json& value) {
    json j = base;
    j[key] = value;
    return j;
  };
  auto without = [&](const char* key) {
    json j = base;
    j.erase(key);
    return j;
  };
  ExpectRejected(with("architectures", {"MistralForCausalLM"}), "unsupported architecture");
  ExpectRejected(with("architectures", "LM2ForCausalLM"), "architectures");
  ExpectRejected(with("rope_scaling", {{"type", "linear"}, {"factor", 2.0}}), "rope_scaling");
  ExpectRejected(with("hidden_act", "gelu"), "hidden_act");
  ExpectRejected(with("attention_bias", true), "attention_bias");
  ExpectRejected(with("mlp_bias", true), "mlp_bias");
  // Heads that do not divide.
  json heads = without("head_dim");
  heads["num_attention_heads"] = 5;
  heads["num_key_value_heads"] = 5;
  ExpectRejected(heads, "divisible by num_attention_heads");
  ExpectRejected(with("num_key_value_heads", 3), "multiple of num_key_value_heads");
  ExpectRejected(with("head_dim", 15), "head_dim must be even");
  ExpectRejected(with("memory_heads", 3), "memory_heads");
  // Bad memory_layers.
  ExpectRejected(with("memory_layers", {2, 1}), "memory_layers");
  ExpectRejected(with("memory_layers", {0, 0}), "memory_layers");
  ExpectRejected(with("memory_layers", {3}), "memory_layers");
  ExpectRejected(with("memory_layers", {-1}), "memory_layers");
  ExpectRejected(with("memory_layers", json::array()), "memory_layers");
  ExpectRejected(with("memory_layers", "all"), "memory_layers");
  ExpectRejected(with("memory_layers", {0.5}), "memory_layers");
  ExpectRejected(with("memory_slots", 0), "memory_slots");
  ExpectRejected(with("memory_slots", -4), "memory_slots");
  // Missing keys.
  for (const char* key : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"}) {
    ExpectRejected(without(key), key);
  }
  // Wrong JSON types.
  ExpectRejected(with("hidden_size", "64"), "hidden_size");
  ExpectRejected(with("hidden_size", 64.5), "hidden_size");
  ExpectRejected(with("hidden_size", true), "hidden_size");
  ExpectRejected(with("vocab_size", 0), "vocab_size");
  ExpectRejected(with("num_hidden_layers", -1), "num_hidden_layers");
  ExpectRejected(with("tie_word_embeddings", "yes"), "tie_word_embeddings");
  ExpectRejected(with("rms_norm_eps", "small"), "rms_norm_eps");
  ExpectRejected(with("rms_norm_eps", 0), "rms_norm_eps");
  ExpectRejected(with("rope_theta", -1.0), "rope_theta");
  ExpectRejected(with("bos_token_id", "one"), "bos_token_id");
  ExpectRejected(with("vocab_size", json(UINT64_MAX)), "vocab_size");
  ExpectRejected(with("vocab_size", int64_t{1} << 58), "overflow");
  // Not JSON / not an object.
  for (const char* text : {"", "{", "[1, 2]", "null", "{\"vocab_size\": 1,}"}) {
    auto c = ModelConfig::FromJson(text);
    INFO(text);
    REQUIRE_FALSE(c.ok());
    CHECK(c.status().IsInvalidArgument());
  }
}

TEST_CASE("config: Load of a missing directory is NotFound", "[config][loader]") {
  auto c = ModelConfig::Load("/nonexistent/lm2/model");
  REQUIRE_FALSE(c.ok());
  CHECK(c.status().IsNotFound());
}

TEST_CASE("config: CanonicalJson is sorted, stable and covers every field", "[config][loader]") {
  auto c = ModelConfig::Load(lm2::testing::TestModel("tiny-lm2"));
  REQUIRE(c.ok());
  const std::string text = c->CanonicalJson();
  const json j = json::parse(text);
  CHECK(j.size() == 18);
  CHECK(text.find(' ') == std::string::npos);
  CHECK(text.rfind("{\"bos_token_id\":1,", 0) == 0);
  CHECK(j["memory_layers"] == json({0, 1, 2}));
  CHECK(j["rms_norm_eps"].get<double>() == 1e-5);
  // Round trip through the parser gives the same canonical text.
  ModelConfig copy = *c;
  CHECK(copy.CanonicalJson() == text);
  copy.rope_theta = 500000.0;
  CHECK(copy.CanonicalJson() != text);
  copy = *c;
  copy.memory_layers = {0, 2};
  CHECK(copy.CanonicalJson() != text);
  CHECK(copy.Validate().ok());
  copy.memory_layers = {2, 0};
  CHECK(copy.Validate().IsInvalidArgument());
}
