// `lm2 inspect DIR`: config, parameter counts, memory layout, weights, tokenizer and
// fingerprint of a model directory. Validates the whole directory (ModelFiles::Open).
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "commands.h"
#include "format.h"
#include "lm2/runtime/model_files.h"
#include "lm2/runtime/tokenizer.h"

namespace lm2::cli {
namespace {

using runtime::ModelConfig;
using runtime::ModelFiles;
using runtime::Tokenizer;

constexpr std::string_view kUsage =
    "usage: lm2 inspect [--no-fingerprint] DIR\n"
    "\n"
    "Opens and validates the model directory DIR (config.json, *.safetensors, optional\n"
    "tokenizer.model and chat_template.json) and prints its configuration, parameter\n"
    "counts (backbone, and memory: 7d^2 + 3d per memory layer), the memory layout and\n"
    "the size of one session's memory bank, the weight files, a tokenizer summary and the\n"
    "model fingerprint (SHA-256 over the config and every weight; hashing reads every byte).\n"
    "\n"
    "  --no-fingerprint   skip the fingerprint (fast on very large models)\n"
    "\n"
    "Exit status 1 with the reason on stderr when DIR is not a valid model directory.\n";

int Fail(const Status& s) {
  std::fprintf(stderr, "lm2 inspect: %s\n", s.ToString().c_str());
  return kExitError;
}

bool IsMemoryTensor(const std::string& name) { return name.find(".memory.") != std::string::npos; }

void PrintConfig(const ModelConfig& c) {
  std::printf("config\n");
  std::printf("  vocab_size               %lld\n", static_cast<long long>(c.vocab_size));
  std::printf("  hidden_size (d)          %lld\n", static_cast<long long>(c.hidden_size));
  std::printf("  intermediate_size        %lld\n", static_cast<long long>(c.intermediate_size));
  std::printf("  num_hidden_layers        %lld\n", static_cast<long long>(c.num_layers));
  std::printf("  attention heads          %lld query, %lld key/value, head_dim %lld\n",
              static_cast<long long>(c.num_heads), static_cast<long long>(c.num_kv_heads),
              static_cast<long long>(c.head_dim));
  std::printf("  rms_norm_eps             %g\n", c.rms_norm_eps);
  std::printf("  rope_theta               %g\n", c.rope_theta);
  std::printf("  max_position_embeddings  %lld\n", static_cast<long long>(c.max_position_embeddings));
  std::printf("  tie_word_embeddings      %s\n", c.tie_word_embeddings ? "true" : "false");
  std::printf("  bos / eos token ids      %d / %d\n", c.bos_token_id, c.eos_token_id);
}

void PrintParameters(const ModelFiles& files) {
  const ModelConfig& c = files.config();
  uint64_t total = 0, memory = 0, init = 0;
  for (const auto& spec : files.specs()) {
    const auto n = static_cast<uint64_t>(runtime::NumElements(spec.shape));
    total += n;
    if (IsMemoryTensor(spec.name)) {
      memory += n;
      if (spec.name.size() >= 5 && spec.name.compare(spec.name.size() - 5, 5, ".init") == 0) init += n;
    }
  }
  const auto d = static_cast<uint64_t>(c.hidden_size);
  std::printf("parameters\n");
  std::printf("  total                    %s (%s)\n", WithCommas(total).c_str(), HumanCount(total).c_str());
  std::printf("  backbone                 %s (%s)\n", WithCommas(total - memory).c_str(),
              HumanCount(total - memory).c_str());
  std::printf("  memory                   %s (%s)", WithCommas(memory).c_str(), HumanCount(memory).c_str());
  if (c.has_memory()) {
    std::printf(" = %zu x (7d^2 + 3d = %s)", c.memory_layers.size(), WithCommas(7 * d * d + 3 * d).c_str());
    if (init > 0) std::printf(" + learned init %s", WithCommas(init).c_str());
  }
  std::printf("\n");
}

void PrintMemory(const ModelConfig& c) {
  std::printf("memory\n");
  if (!c.has_memory()) {
    std::printf("  none (a vanilla Llama model)\n");
    return;
  }
  const auto layers = static_cast<uint64_t>(c.memory_layers.size());
  const uint64_t bank = layers * static_cast<uint64_t>(c.memory_slots) * static_cast<uint64_t>(c.hidden_size) * 4;
  std::printf("  layers                   %s (%llu of %lld)\n", ListString(c.memory_layers).c_str(),
              static_cast<unsigned long long>(layers), static_cast<long long>(c.num_layers));
  std::printf("  slots x width            %lld x %lld (%lld heads of %lld)\n", static_cast<long long>(c.memory_slots),
              static_cast<long long>(c.hidden_size), static_cast<long long>(c.memory_heads),
              static_cast<long long>(c.memory_head_dim()));
  std::printf("  initial bank             %s\n", c.memory_learned_init ? "learned (memory.init)" : "identity rows");
  if (c.memory_segment_tokens > 0) {
    std::printf("  segment                  every %lld tokens\n", static_cast<long long>(c.memory_segment_tokens));
  } else {
    std::printf("  segment                  where the caller ends it (per turn)\n");
  }
  std::printf("  bank per session (fp32)  %s (%llu x %lld x %lld x 4 B)\n", HumanBytes(bank).c_str(),
              static_cast<unsigned long long>(layers), static_cast<long long>(c.memory_slots),
              static_cast<long long>(c.hidden_size));
}

void PrintWeights(const ModelFiles& files) {
  std::map<std::string, int> dtypes;
  for (const auto& spec : files.specs()) {
    auto v = files.Tensor(spec.name);
    if (v.ok()) ++dtypes[std::string(runtime::DTypeName(v->dtype))];
  }
  std::string dtype_text;
  for (const auto& [name, count] : dtypes) {
    dtype_text += (dtype_text.empty() ? "" : ", ") + name + " x " + std::to_string(count);
  }
  const auto& names = files.weight_files();
  std::printf("weights\n");
  std::printf("  files                    %zu (%s%s)\n", names.size(), names.front().c_str(),
              names.size() > 1 ? ", ..." : "");
  std::printf("  tensors                  %zu (%s)\n", files.specs().size(), dtype_text.c_str());
  std::printf("  size                     %s\n", HumanBytes(files.weight_bytes()).c_str());
}

// Returns false when the tokenizer exists but cannot be used.
bool PrintTokenizer(const std::string& dir) {
  std::printf("tokenizer\n");
  auto tok = Tokenizer::Open(dir);
  if (!tok.ok()) {
    if (tok.status().IsNotFound()) {
      std::printf("  none (%s)\n", std::string(tok.status().message()).c_str());
      return true;
    }
    std::printf("  error: %s\n", tok.status().ToString().c_str());
    return false;
  }
  const Tokenizer& t = **tok;
  std::printf("  vocabulary               %d pieces (sentencepiece)\n", t.vocab_size());
  std::printf("  control ids              unk %d, bos %d, eos %d, pad %d\n", t.unk_id(), t.bos_id(), t.eos_id(),
              t.pad_id());
  if (t.user_id() >= 0) {
    std::printf("  chat symbols             <|user|> %d, <|assistant|> %d, <|end|> %d\n", t.user_id(), t.assistant_id(),
                t.end_id());
  } else {
    std::printf("  chat symbols             none\n");
  }
  auto file = runtime::ChatTemplate::Load(dir);
  std::printf("  chat template            %s\n", file.ok() ? "chat_template.json" : "default (no chat_template.json)");
  std::string stops;
  for (int32_t id : t.stop_ids()) stops += (stops.empty() ? "" : ", ") + t.IdToPiece(id) + " " + std::to_string(id);
  std::printf("  stop ids                 %s\n", stops.empty() ? "none" : stops.c_str());
  return true;
}

int RunInspect(const std::vector<std::string>& args) {
  std::string dir;
  bool fingerprint = true;
  for (const std::string& a : args) {
    if (a == "--no-fingerprint") {
      fingerprint = false;
    } else if (!a.empty() && a[0] == '-') {
      std::fprintf(stderr, "lm2 inspect: unknown option '%s'\n\n%.*s", a.c_str(), static_cast<int>(kUsage.size()),
                   kUsage.data());
      return kExitUsage;
    } else if (dir.empty()) {
      dir = a;
    } else {
      std::fprintf(stderr, "lm2 inspect: one model directory expected\n\n%.*s", static_cast<int>(kUsage.size()),
                   kUsage.data());
      return kExitUsage;
    }
  }
  if (dir.empty()) {
    std::fprintf(stderr, "%.*s", static_cast<int>(kUsage.size()), kUsage.data());
    return kExitUsage;
  }
  auto files = runtime::ModelFiles::Open(dir);
  if (!files.ok()) return Fail(files.status());
  const ModelFiles& f = **files;
  const ModelConfig& c = f.config();
  std::printf("model                      %s\n", dir.c_str());
  std::printf("architecture               %s\n",
              c.has_memory() ? "LM2ForCausalLM (Llama decoder with memory)" : "LlamaForCausalLM (no memory)");
  PrintConfig(c);
  PrintParameters(f);
  PrintMemory(c);
  PrintWeights(f);
  const bool tokenizer_ok = PrintTokenizer(dir);
  if (fingerprint) std::printf("fingerprint                %s\n", f.Fingerprint().c_str());
  std::fflush(stdout);
  if (!tokenizer_ok) {
    std::fprintf(stderr, "lm2 inspect: %s: tokenizer.model cannot be used\n", dir.c_str());
    return kExitError;
  }
  return kExitOk;
}

}  // namespace

const Command kInspectCommand = {"inspect", "validate a model directory and print its config, sizes and fingerprint",
                                 kUsage, &RunInspect};

}  // namespace lm2::cli
