// ChatTemplate: DIR/chat_template.json.
#include "lm2/runtime/chat_template.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

namespace lm2::runtime {
namespace {

using json = nlohmann::json;

Status Bad(const std::string& msg) { return Status::InvalidArgument("chat_template.json: " + msg); }

Status GetString(const json& j, const char* key, std::string* out) {
  auto it = j.find(key);
  if (it == j.end()) return Status::Ok();
  if (!it->is_string()) return Bad(std::string("\"") + key + "\" must be a string");
  *out = it->get<std::string>();
  return Status::Ok();
}

}  // namespace

ChatTemplate ChatTemplate::Plain() {
  ChatTemplate t;
  t.user_prefix.clear();
  t.user_suffix.clear();
  t.assistant_prefix.clear();
  t.assistant_suffix.clear();
  t.stop.clear();
  return t;
}

Result<ChatTemplate> ChatTemplate::FromJson(std::string_view json_text) {
  const json j = json::parse(json_text.begin(), json_text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Bad("not valid JSON");
  if (!j.is_object()) return Bad("top level must be a JSON object");
  auto format = j.find("format");
  if (format == j.end() || !format->is_string() || format->get<std::string>() != kFormat) {
    return Bad("\"format\" must be \"" + std::string(kFormat) + "\"");
  }
  for (const auto& [key, value] : j.items()) {
    if (key != "format" && key != "add_bos" && key != "user_prefix" && key != "user_suffix" &&
        key != "assistant_prefix" && key != "assistant_suffix" && key != "stop") {
      return Bad("unknown key \"" + key + "\"");
    }
  }
  ChatTemplate t;
  if (auto it = j.find("add_bos"); it != j.end()) {
    if (!it->is_boolean()) return Bad("\"add_bos\" must be true or false");
    t.add_bos = it->get<bool>();
  }
  LM2_RETURN_IF_ERROR(GetString(j, "user_prefix", &t.user_prefix));
  LM2_RETURN_IF_ERROR(GetString(j, "user_suffix", &t.user_suffix));
  LM2_RETURN_IF_ERROR(GetString(j, "assistant_prefix", &t.assistant_prefix));
  LM2_RETURN_IF_ERROR(GetString(j, "assistant_suffix", &t.assistant_suffix));
  if (auto it = j.find("stop"); it != j.end()) {
    if (!it->is_array()) return Bad("\"stop\" must be a list of strings");
    t.stop.clear();
    for (const json& s : *it) {
      if (!s.is_string() || s.get<std::string>().empty()) return Bad("\"stop\" must be a list of non-empty strings");
      t.stop.push_back(s.get<std::string>());
    }
  }
  return t;
}

Result<ChatTemplate> ChatTemplate::Load(const std::string& model_dir) {
  const std::string path = model_dir + "/" + std::string(kFileName);
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return Status::NotFound(path + ": no such file");
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::IOError(path + ": cannot open");
  std::ostringstream text;
  text << in.rdbuf();
  auto t = FromJson(text.str());
  if (!t.ok()) return t.status().WithContext(model_dir);
  return t;
}

std::string ChatTemplate::ToJson() const {
  const json j = {{"format", kFormat},
                  {"add_bos", add_bos},
                  {"user_prefix", user_prefix},
                  {"user_suffix", user_suffix},
                  {"assistant_prefix", assistant_prefix},
                  {"assistant_suffix", assistant_suffix},
                  {"stop", stop}};
  return j.dump(2);
}

std::string ChatTemplate::RenderUserTurn(std::string_view message) const {
  std::string out = user_prefix;
  out += message;
  out += user_suffix;
  out += assistant_prefix;
  return out;
}

}  // namespace lm2::runtime
