#include "lm2/runtime/generate.h"

#include <algorithm>
#include <chrono>

#include "out_of_memory.h"

namespace lm2::runtime {
namespace {

using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// Holds back text that may still turn into a stop string, and finds stop strings.
class StopMatcher {
 public:
  explicit StopMatcher(const std::vector<std::string>& stops) : stops_(stops) {}

  // Appends `piece`; returns true when a stop string now occurs (text is cut before it).
  bool Append(std::string_view piece, std::string& text) const {
    const std::size_t scan_from = text.size();
    text.append(piece);
    for (const auto& s : stops_) {
      if (s.empty()) continue;
      const std::size_t from = scan_from >= s.size() ? scan_from - s.size() + 1 : 0;
      const std::size_t at = text.find(s, from);
      if (at != std::string::npos) {
        text.resize(at);
        return true;
      }
    }
    return false;
  }

  // How many trailing bytes of `text` could begin a stop string (must be held back).
  std::size_t Holdback(const std::string& text) const {
    std::size_t hold = 0;
    for (const auto& s : stops_) {
      for (std::size_t n = std::min(s.size() - 1, text.size()); n > hold; --n) {
        if (text.compare(text.size() - n, n, s, 0, n) == 0) {
          hold = n;
          break;
        }
      }
    }
    return hold;
  }

 private:
  const std::vector<std::string>& stops_;
};

// `call`, run again while GenerateOptions::on_out_of_memory releases memory for it.
Status Retrying(const GenerateOptions& options, const std::function<Status()>& call) {
  return internal::RetryOutOfMemory(options.on_out_of_memory, call);
}

Status Prefill(const Model& model, SequenceState& state, std::span<const int32_t> prompt,
               const GenerateOptions& options, std::vector<float>* logits) {
  const ModelConfig& cfg = model.config();
  const auto remaining = cfg.max_position_embeddings - state.context_length();
  const auto forward = [&](std::span<const int32_t> tokens, LogitsMode mode, std::vector<float>* out) {
    return Retrying(options, [&] { return model.Forward(state, tokens, mode, out); });
  };
  const auto end_segment = [&] { return Retrying(options, [&] { return model.EndSegment(state); }); };
  if (static_cast<int64_t>(prompt.size()) < remaining) {
    return forward(prompt, LogitsMode::kLast, logits);
  }
  if (!options.split_long_prompt) {
    return Status::OutOfRange("prompt of " + std::to_string(prompt.size()) + " tokens does not fit the " +
                              std::to_string(remaining) + " positions left in the context (max_position_embeddings=" +
                              std::to_string(cfg.max_position_embeddings) +
                              "); set split_long_prompt to process it in memory segments");
  }
  if (!cfg.has_memory()) {
    return Status::OutOfRange("prompt does not fit the context and the model has no memory to carry it");
  }
  const int64_t chunk = cfg.memory_segment_tokens > 0
                            ? std::min(cfg.memory_segment_tokens, cfg.max_position_embeddings / 2)
                            : cfg.max_position_embeddings / 2;
  std::size_t at = 0;
  // Every chunk but the last is its own segment in an empty context; the last stays open
  // for the reply, with room left to generate.
  while (prompt.size() - at > static_cast<std::size_t>(chunk)) {
    if (state.context_length() > 0 || state.segment_open()) {
      LM2_RETURN_IF_ERROR(end_segment());
      model.ResetContext(state);
    }
    LM2_RETURN_IF_ERROR(forward(prompt.subspan(at, static_cast<std::size_t>(chunk)), LogitsMode::kNone, nullptr));
    at += static_cast<std::size_t>(chunk);
  }
  LM2_RETURN_IF_ERROR(end_segment());
  model.ResetContext(state);
  return forward(prompt.subspan(at), LogitsMode::kLast, logits);
}

}  // namespace

std::string_view StopReasonName(StopReason reason) {
  switch (reason) {
    case StopReason::kStopToken: return "stop_token";
    case StopReason::kStopString: return "stop_string";
    case StopReason::kMaxTokens: return "max_tokens";
    case StopReason::kContextFull: return "context_full";
  }
  return "unknown";
}

Result<GenerateResult> Generate(const Model& model, SequenceState& state, const Tokenizer& tokenizer,
                                Sampler& sampler, std::span<const int32_t> prompt,
                                const GenerateOptions& options, const TextCallback& on_text) {
  if (prompt.empty()) return Status::InvalidArgument("Generate: empty prompt");
  if (options.max_tokens < 1) return Status::InvalidArgument("Generate: max_tokens must be >= 1");
  LM2_RETURN_IF_ERROR(ValidateSamplingOptions(sampler.options()));
  const auto cancelled = [&] { return options.cancel != nullptr && options.cancel->load(std::memory_order_relaxed); };

  GenerateResult result;
  result.prompt_tokens = static_cast<int64_t>(prompt.size());
  std::vector<float> logits;
  auto t0 = Clock::now();
  LM2_RETURN_IF_ERROR(Prefill(model, state, prompt, options, &logits));
  result.prefill_seconds = Since(t0);

  std::vector<int32_t> history(prompt.begin(), prompt.end());
  const std::vector<int32_t>& stop_ids = tokenizer.stop_ids();
  StopMatcher matcher(options.stop_strings);
  StreamDecoder decoder = tokenizer.NewStreamDecoder();
  std::size_t emitted = 0;
  const auto emit_upto = [&](std::size_t end) {
    if (end > emitted && on_text) on_text(std::string_view(result.text).substr(emitted, end - emitted));
    emitted = std::max(emitted, end);
  };

  t0 = Clock::now();
  const int64_t max_context = model.config().max_position_embeddings;
  // Each decode step picks the token after it where the logits are (on the GPU, no logits
  // cross to the host): the sampler makes its draw here and the model applies the rule.
  // The first token comes from the prefill's logits.
  SequenceState* const one[] = {&state};
  std::vector<int32_t> picked;
  // However decoding ends, the batcher stops waiting for this state's next step.
  struct LeaveOnExit {
    DecodeBatcher* batcher;
    const SequenceState& state;
    void operator()() const {
      if (batcher != nullptr) batcher->Leave(state);
    }
    ~LeaveOnExit() { (*this)(); }
  } leave{options.batcher, state};
  const auto step = [&](int32_t token) -> Status {
    const TokenRule rule = sampler.Rule(history);
    if (options.batcher == nullptr) {
      return Retrying(options, [&] {
        return model.ForwardBatchSample(one, std::span<const int32_t>(&token, 1), std::span<const TokenRule>(&rule, 1),
                                        &picked);
      });
    }
    picked.resize(1);
    return options.batcher->Step(state, token, rule, picked.data());
  };
  while (true) {
    if (cancelled()) return Status::Cancelled("generation cancelled");
    if (state.context_length() + 1 > max_context) {  // no room to feed another token
      result.stop = StopReason::kContextFull;
      break;
    }
    const int32_t next = picked.empty() ? sampler.Sample(logits, history) : picked[0];
    result.tokens.push_back(next);
    history.push_back(next);
    const bool is_stop = std::find(stop_ids.begin(), stop_ids.end(), next) != stop_ids.end();
    bool stop_string = false;
    if (!is_stop) {
      LM2_ASSIGN_OR_RETURN(std::string piece, decoder.Push(next));
      stop_string = matcher.Append(piece, result.text);
    }
    // Feed the token so the KV cache and the memory write see the whole reply (a stop
    // token included: training text closes every reply with it).
    const bool last = is_stop || stop_string || static_cast<int32_t>(result.tokens.size()) >= options.max_tokens;
    if (last) {
      leave();  // before the last token's own forward: no batch waits on it
      LM2_RETURN_IF_ERROR(Retrying(
          options, [&] { return model.Forward(state, std::span<const int32_t>(&next, 1), LogitsMode::kNone, nullptr); }));
      result.stop = is_stop ? StopReason::kStopToken
                    : stop_string ? StopReason::kStopString
                                  : StopReason::kMaxTokens;
      break;
    }
    LM2_RETURN_IF_ERROR(step(next));
    emit_upto(result.text.size() - matcher.Holdback(result.text));
  }
  if (result.stop != StopReason::kStopString && result.stop != StopReason::kStopToken &&
      matcher.Append(decoder.Flush(), result.text)) {
    result.stop = StopReason::kStopString;
  }
  emit_upto(result.text.size());
  result.decode_seconds = Since(t0);
  return result;
}

}  // namespace lm2::runtime
