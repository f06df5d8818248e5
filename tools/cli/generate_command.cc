// `lm2 generate`: stream a reply (or several turns) from a model directory.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "commands.h"
#include "lm2/runtime/backend.h"
#include "lm2/runtime/generate.h"
#include "lm2/runtime/model_files.h"
#include "lm2/runtime/tokenizer.h"

namespace lm2::cli {
namespace {

constexpr std::string_view kUsage =
    "usage: lm2 generate --model DIR --prompt TEXT [--prompt TEXT ...] [options]\n"
    "\n"
    "Streams the model's reply to each prompt. Each --prompt is one chat turn: the\n"
    "message and its reply form one memory segment, written to the memory bank before\n"
    "the next turn. Prompts go through the model's chat template unless --raw.\n"
    "\n"
    "options:\n"
    "  --model DIR               model directory (config.json, *.safetensors, tokenizer.model)\n"
    "  --backend B               auto (default: the GPU when one is present, else the CPU),\n"
    "                            cpu or cuda\n"
    "  --prompt TEXT             a turn (repeatable)\n"
    "  --max-tokens N            reply length limit per turn (default 128)\n"
    "  --temperature T           0 = greedy (default 0)\n"
    "  --top-k K                 keep the K most likely tokens (default 0 = off)\n"
    "  --top-p P                 nucleus sampling mass (default 1 = off)\n"
    "  --repetition-penalty R    > 1 discourages repeats (default 1 = off)\n"
    "  --seed S                  sampling seed (default 0)\n"
    "  --stop TEXT               stop the reply at TEXT (repeatable)\n"
    "  --raw                     no chat template: the prompt text is the model input\n"
    "  --reset-context           empty the self-attention context between turns, so only\n"
    "                            the memory bank carries earlier turns\n"
    "  --split-long-prompt       process a prompt longer than the context in memory segments\n"
    "  --quiet                   no statistics on stderr\n";

struct Args {
  std::string model;
  std::vector<std::string> prompts;
  runtime::GenerateOptions gen;
  runtime::SamplingOptions sampling;
  runtime::BackendKind backend = runtime::BackendKind::kAuto;
  bool raw = false, reset_context = false, quiet = false;
};

bool ParseNumber(const std::string& s, double* out) {
  char* end = nullptr;
  *out = std::strtod(s.c_str(), &end);
  return end != s.c_str() && *end == '\0' && std::isfinite(*out);
}

// Returns an empty string on success, else the problem.
std::string Parse(const std::vector<std::string>& a, Args* args) {
  args->gen.max_tokens = 128;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const std::string& k = a[i];
    if (k == "--raw") { args->raw = true; continue; }
    if (k == "--reset-context") { args->reset_context = true; continue; }
    if (k == "--split-long-prompt") { args->gen.split_long_prompt = true; continue; }
    if (k == "--quiet") { args->quiet = true; continue; }
    if (i + 1 >= a.size()) return "missing value after " + k;
    const std::string& v = a[++i];
    double num = 0.0;
    const bool is_num = ParseNumber(v, &num);
    if (k == "--model") args->model = v;
    else if (k == "--prompt") args->prompts.push_back(v);
    else if (k == "--stop") args->gen.stop_strings.push_back(v);
    else if (k == "--backend") {
      auto kind = runtime::ParseBackendKind(v);
      if (!kind) return "--backend must be auto, cpu or cuda, got '" + v + "'";
      args->backend = *kind;
    }
    else if (!is_num) return "option " + k + " needs a number, got '" + v + "'";
    else if (k == "--max-tokens") args->gen.max_tokens = static_cast<int32_t>(num);
    else if (k == "--temperature") args->sampling.temperature = static_cast<float>(num);
    else if (k == "--top-k") args->sampling.top_k = static_cast<int32_t>(num);
    else if (k == "--top-p") args->sampling.top_p = static_cast<float>(num);
    else if (k == "--repetition-penalty") args->sampling.repetition_penalty = static_cast<float>(num);
    else if (k == "--seed") args->sampling.seed = static_cast<uint64_t>(num);
    else return "unknown option " + k;
  }
  if (args->model.empty()) return "--model is required";
  if (args->prompts.empty()) return "at least one --prompt is required";
  return {};
}

int Fail(const Status& s) {
  std::fprintf(stderr, "lm2 generate: %s\n", s.ToString().c_str());
  return kExitError;
}

int Run(const std::vector<std::string>& argv) {
  Args args;
  if (std::string err = Parse(argv, &args); !err.empty()) {
    std::fprintf(stderr, "lm2 generate: %s\n\n%.*s", err.c_str(), static_cast<int>(kUsage.size()), kUsage.data());
    return kExitUsage;
  }
  if (Status s = runtime::ValidateSamplingOptions(args.sampling); !s.ok()) return Fail(s);
  if (!args.quiet) std::fprintf(stderr, "loading %s ...\n", args.model.c_str());
  auto files = runtime::ModelFiles::Open(args.model);
  if (!files.ok()) return Fail(files.status());
  runtime::BackendOptions backend;
  backend.kind = args.backend;
  auto model = runtime::LoadModel(std::shared_ptr<const runtime::ModelFiles>(std::move(files).value()), backend);
  if (!model.ok()) return Fail(model.status());
  auto tokenizer = runtime::Tokenizer::Open(args.model);
  if (!tokenizer.ok()) return Fail(tokenizer.status());
  auto state = (*model)->NewState();
  if (!state.ok()) return Fail(state.status());
  if (!args.quiet) {
    std::fprintf(stderr, "backend %s, %lld memory layers\n", (*model)->backend_name().c_str(),
                 static_cast<long long>((*model)->config().memory_layers.size()));
  }
  runtime::Sampler sampler(args.sampling);
  for (std::size_t turn = 0; turn < args.prompts.size(); ++turn) {
    if (args.reset_context) (*model)->ResetContext(**state);
    Result<std::vector<int32_t>> prompt =
        args.raw ? (*tokenizer)->Encode(args.prompts[turn]) : (*tokenizer)->RenderUserTurn(args.prompts[turn], turn == 0);
    if (!prompt.ok()) return Fail(prompt.status());
    if (args.raw && turn == 0 && (*tokenizer)->bos_id() >= 0) prompt->insert(prompt->begin(), (*tokenizer)->bos_id());
    if (args.prompts.size() > 1) std::printf("[%zu] %s\n> ", turn + 1, args.prompts[turn].c_str());
    auto result = runtime::Generate(**model, **state, **tokenizer, sampler, *prompt, args.gen, [](std::string_view t) {
      std::fwrite(t.data(), 1, t.size(), stdout);
      std::fflush(stdout);
    });
    if (!result.ok()) return Fail(result.status());
    std::printf("\n");
    if (Status s = (*model)->EndSegment(**state); !s.ok()) return Fail(s);  // the turn's memory write
    if (!args.quiet) {
      const double gen = static_cast<double>(result->tokens.size());
      std::fprintf(stderr, "[%lld prompt tokens, %.1f tokens/s prefill; %zu generated, %.1f tokens/s; stop: %.*s]\n",
                   static_cast<long long>(result->prompt_tokens),
                   static_cast<double>(result->prompt_tokens) / std::max(result->prefill_seconds, 1e-9),
                   result->tokens.size(), gen / std::max(result->decode_seconds, 1e-9),
                   static_cast<int>(runtime::StopReasonName(result->stop).size()),
                   runtime::StopReasonName(result->stop).data());
    }
  }
  return kExitOk;
}

}  // namespace

const Command kGenerateCommand = {"generate", "stream replies from a model, one memory segment per turn", kUsage, Run};

}  // namespace lm2::cli
