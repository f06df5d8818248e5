// ModelConfig: parsing and validating config.json (mirrors tools/lm2ref/config.py).
#include "lm2/runtime/model_config.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

namespace lm2::runtime {
namespace {

using json = nlohmann::json;

constexpr std::string_view kLm2Arch = "LM2ForCausalLM";
constexpr std::string_view kLlamaArch = "LlamaForCausalLM";

Status Bad(const std::string& msg) { return Status::InvalidArgument("config.json: " + msg); }

// Reads an optional integer key into *out. JSON null counts as absent.
Status GetInt(const json& j, const char* key, int64_t* out, bool required) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    return required ? Bad(std::string("missing required key \"") + key + "\"") : Status::Ok();
  }
  if (it->is_number_unsigned()) {
    const auto u = it->get<uint64_t>();
    if (u > static_cast<uint64_t>(INT64_MAX)) return Bad(std::string("\"") + key + "\" is out of range");
    *out = static_cast<int64_t>(u);
    return Status::Ok();
  }
  if (it->is_number_integer()) {
    *out = it->get<int64_t>();
    return Status::Ok();
  }
  return Bad(std::string("\"") + key + "\" must be an integer (got " + it->dump() + ")");
}

Status GetDouble(const json& j, const char* key, double* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return Status::Ok();
  if (!it->is_number()) return Bad(std::string("\"") + key + "\" must be a number (got " + it->dump() + ")");
  *out = it->get<double>();
  return Status::Ok();
}

Status GetBool(const json& j, const char* key, bool* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return Status::Ok();
  if (!it->is_boolean()) return Bad(std::string("\"") + key + "\" must be true or false (got " + it->dump() + ")");
  *out = it->get<bool>();
  return Status::Ok();
}

Status GetTokenId(const json& j, const char* key, int32_t* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return Status::Ok();
  const json* v = &*it;
  if (v->is_array()) {  // Hugging Face allows a list of ids; the first is the canonical one
    if (v->empty()) return Status::Ok();
    v = &(*v)[0];
  }
  if (!v->is_number_integer()) return Bad(std::string("\"") + key + "\" must be an integer token id");
  const int64_t id = v->get<int64_t>();
  if (id < 0 || id > INT32_MAX) return Bad(std::string("\"") + key + "\" is out of range");
  *out = static_cast<int32_t>(id);
  return Status::Ok();
}

// Python-style truthiness for the "unsupported feature" keys.
bool Truthy(const json& v) {
  if (v.is_null()) return false;
  if (v.is_boolean()) return v.get<bool>();
  if (v.is_number()) return v.get<double>() != 0.0;
  if (v.is_string() || v.is_array() || v.is_object()) return !v.empty();
  return true;
}

bool MulOk(int64_t a, int64_t b) {
  int64_t r;
  return !__builtin_mul_overflow(a, b, &r);
}

}  // namespace

bool ModelConfig::layer_has_memory(int64_t layer) const {
  return std::binary_search(memory_layers.begin(), memory_layers.end(), layer);
}

Status ModelConfig::Validate() const {
  const std::pair<const char*, int64_t> positive[] = {
      {"vocab_size", vocab_size},
      {"hidden_size", hidden_size},
      {"intermediate_size", intermediate_size},
      {"num_hidden_layers", num_layers},
      {"num_attention_heads", num_heads},
      {"num_key_value_heads", num_kv_heads},
      {"head_dim", head_dim},
      {"max_position_embeddings", max_position_embeddings},
  };
  for (const auto& [key, value] : positive) {
    if (value <= 0) return Bad(std::string(key) + " must be a positive integer (got " + std::to_string(value) + ")");
  }
  if (num_heads % num_kv_heads != 0) {
    return Bad("num_attention_heads (" + std::to_string(num_heads) + ") must be a multiple of num_key_value_heads (" +
               std::to_string(num_kv_heads) + ")");
  }
  if (head_dim % 2 != 0) return Bad("head_dim must be even (rotary embeddings pair dimensions)");
  if (!(rms_norm_eps > 0) || !(rope_theta > 0)) return Bad("rms_norm_eps and rope_theta must be positive");
  if (bos_token_id < 0 || eos_token_id < 0) return Bad("bos_token_id and eos_token_id must be >= 0");
  // Every weight's element count must fit in int64 with room for 4-byte elements.
  const int64_t kMaxElems = INT64_MAX / 8;
  const int64_t dims[][2] = {{vocab_size, hidden_size},
                             {num_heads, head_dim},
                             {num_kv_heads, head_dim},
                             {intermediate_size, hidden_size},
                             {memory_slots, hidden_size},
                             {hidden_size, hidden_size}};
  for (const auto& d : dims) {
    if (!MulOk(d[0], d[1]) || d[0] * d[1] > kMaxElems) return Bad("tensor sizes overflow 64-bit byte counts");
  }
  if (!MulOk(num_heads * head_dim, hidden_size) || num_heads * head_dim * hidden_size > kMaxElems) {
    return Bad("tensor sizes overflow 64-bit byte counts");
  }
  if (memory_slots < 0 || memory_segment_tokens < 0) return Bad("memory_slots and memory_segment_tokens must be >= 0");
  if (memory_slots == 0) {
    if (!memory_layers.empty()) return Bad("memory_layers given but memory_slots is 0");
    return Status::Ok();
  }
  if (memory_heads <= 0 || hidden_size % memory_heads != 0) {
    return Bad("hidden_size (" + std::to_string(hidden_size) + ") must be divisible by memory_heads (" +
               std::to_string(memory_heads) + ")");
  }
  if (memory_layers.empty()) return Bad("memory_layers is empty but memory_slots > 0");
  for (std::size_t i = 0; i < memory_layers.size(); ++i) {
    const int64_t l = memory_layers[i];
    if (l < 0 || l >= num_layers || (i > 0 && l <= memory_layers[i - 1])) {
      return Bad("memory_layers must be sorted, unique layer indices in [0, num_hidden_layers)");
    }
  }
  return Status::Ok();
}

Result<ModelConfig> ModelConfig::FromJson(std::string_view json_text) {
  const json j = json::parse(json_text.begin(), json_text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Bad("not valid JSON");
  if (!j.is_object()) return Bad("top level must be a JSON object");

  std::string arch(kLlamaArch);
  if (auto it = j.find("architectures"); it != j.end() && !it->is_null()) {
    if (!it->is_array()) return Bad("\"architectures\" must be a list of strings");
    if (!it->empty()) {
      if (!(*it)[0].is_string()) return Bad("\"architectures\" must be a list of strings");
      arch = (*it)[0].get<std::string>();
    }
  }
  if (arch != kLm2Arch && arch != kLlamaArch) {
    return Bad("unsupported architecture \"" + arch + "\" (expected LM2ForCausalLM or LlamaForCausalLM)");
  }
  if (auto it = j.find("hidden_act"); it != j.end() && !it->is_null()) {
    if (!it->is_string() || it->get<std::string>() != "silu") {
      return Bad("unsupported hidden_act " + it->dump() + " (only silu)");
    }
  }
  if (auto it = j.find("rope_scaling"); it != j.end() && Truthy(*it)) return Bad("rope_scaling is not supported");
  for (const char* key : {"attention_bias", "mlp_bias"}) {
    if (auto it = j.find(key); it != j.end() && Truthy(*it)) {
      return Bad(std::string(key) + " is not supported (the model has no biases)");
    }
  }

  ModelConfig c;
  LM2_RETURN_IF_ERROR(GetInt(j, "vocab_size", &c.vocab_size, true));
  LM2_RETURN_IF_ERROR(GetInt(j, "hidden_size", &c.hidden_size, true));
  LM2_RETURN_IF_ERROR(GetInt(j, "intermediate_size", &c.intermediate_size, true));
  LM2_RETURN_IF_ERROR(GetInt(j, "num_hidden_layers", &c.num_layers, true));
  LM2_RETURN_IF_ERROR(GetInt(j, "num_attention_heads", &c.num_heads, true));
  c.num_kv_heads = c.num_heads;
  LM2_RETURN_IF_ERROR(GetInt(j, "num_key_value_heads", &c.num_kv_heads, false));
  if (auto it = j.find("head_dim"); it != j.end() && !it->is_null()) {
    LM2_RETURN_IF_ERROR(GetInt(j, "head_dim", &c.head_dim, true));
  } else {
    if (c.num_heads <= 0 || c.hidden_size % c.num_heads != 0) {
      return Bad("hidden_size (" + std::to_string(c.hidden_size) + ") must be divisible by num_attention_heads (" +
                 std::to_string(c.num_heads) + ")");
    }
    c.head_dim = c.hidden_size / c.num_heads;
  }
  LM2_RETURN_IF_ERROR(GetDouble(j, "rms_norm_eps", &c.rms_norm_eps));
  LM2_RETURN_IF_ERROR(GetDouble(j, "rope_theta", &c.rope_theta));
  LM2_RETURN_IF_ERROR(GetInt(j, "max_position_embeddings", &c.max_position_embeddings, false));
  LM2_RETURN_IF_ERROR(GetBool(j, "tie_word_embeddings", &c.tie_word_embeddings));
  LM2_RETURN_IF_ERROR(GetTokenId(j, "bos_token_id", &c.bos_token_id));
  LM2_RETURN_IF_ERROR(GetTokenId(j, "eos_token_id", &c.eos_token_id));

  LM2_RETURN_IF_ERROR(GetInt(j, "memory_slots", &c.memory_slots, false));
  LM2_RETURN_IF_ERROR(GetInt(j, "memory_heads", &c.memory_heads, false));
  LM2_RETURN_IF_ERROR(GetInt(j, "memory_segment_tokens", &c.memory_segment_tokens, false));
  LM2_RETURN_IF_ERROR(GetBool(j, "memory_learned_init", &c.memory_learned_init));
  if (arch == kLm2Arch && c.memory_slots <= 0) return Bad("LM2ForCausalLM config needs memory_slots > 0");
  if (c.memory_slots > 0) {
    auto it = j.find("memory_layers");
    if (it == j.end() || it->is_null()) {
      for (int64_t i = 0; i < c.num_layers; ++i) c.memory_layers.push_back(i);
    } else {
      if (!it->is_array()) return Bad("\"memory_layers\" must be a list of layer indices");
      for (const json& v : *it) {
        if (!v.is_number_integer()) return Bad("\"memory_layers\" must be a list of layer indices");
        c.memory_layers.push_back(v.get<int64_t>());
      }
    }
  }
  LM2_RETURN_IF_ERROR(c.Validate());
  return c;
}

Result<ModelConfig> ModelConfig::Load(const std::string& model_dir) {
  const std::string path = model_dir + "/config.json";
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::NotFound(path + ": cannot open (not a model directory?)");
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return Status::IOError(path + ": read failed");
  auto config = FromJson(text.str());
  if (!config.ok()) return config.status().WithContext(model_dir);
  return config;
}

std::string ModelConfig::CanonicalJson() const {
  json j = json::object();  // std::map-backed: keys come out sorted
  j["bos_token_id"] = bos_token_id;
  j["eos_token_id"] = eos_token_id;
  j["head_dim"] = head_dim;
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["max_position_embeddings"] = max_position_embeddings;
  j["memory_heads"] = memory_heads;
  j["memory_layers"] = memory_layers;
  j["memory_learned_init"] = memory_learned_init;
  j["memory_segment_tokens"] = memory_segment_tokens;
  j["memory_slots"] = memory_slots;
  j["num_attention_heads"] = num_heads;
  j["num_hidden_layers"] = num_layers;
  j["num_key_value_heads"] = num_kv_heads;
  j["rms_norm_eps"] = rms_norm_eps;
  j["rope_theta"] = rope_theta;
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["vocab_size"] = vocab_size;
  return j.dump();
}

}  // namespace lm2::runtime
