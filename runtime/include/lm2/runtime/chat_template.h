// ChatTemplate: how a conversation turn becomes text for the tokenizer, read from
// DIR/chat_template.json (format "lm2-chat-template-1", docs/runtime.md).
//
//   {
//     "format": "lm2-chat-template-1",
//     "add_bos": true,                      BOS before the first turn of a conversation
//     "user_prefix": "<|user|> ",           text before the user's message
//     "user_suffix": "<|end|>",              text after it
//     "assistant_prefix": "<|assistant|>",  text that opens the reply (the model continues)
//     "assistant_suffix": "<|end|>",         text that closes a reply in a replayed transcript
//     "stop": ["<|end|>"]                   pieces that end a reply (each one token)
//   }
//
// Every key but "format" is optional and defaults to the value shown. A turn is rendered
// as one string, user_prefix + message + user_suffix + assistant_prefix, and encoded in
// one pass, so the control symbols become their single ids exactly as in training text.
// Plain value type.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "lm2/core/status.h"

namespace lm2::runtime {

struct ChatTemplate {
  static constexpr std::string_view kFormat = "lm2-chat-template-1";
  static constexpr std::string_view kFileName = "chat_template.json";

  bool add_bos = true;
  std::string user_prefix = "<|user|> ";
  std::string user_suffix = "<|end|>";
  std::string assistant_prefix = "<|assistant|>";
  std::string assistant_suffix = "<|end|>";
  std::vector<std::string> stop = {"<|end|>"};

  // The template for tokenizers without chat symbols: plain text, no prefixes, no stops.
  static ChatTemplate Plain();
  // Parses the JSON text. InvalidArgument naming the key for a wrong type, an unknown
  // key, or a "format" other than kFormat.
  static Result<ChatTemplate> FromJson(std::string_view json_text);
  // Reads DIR/chat_template.json; NotFound when the file does not exist (callers choose
  // a default: Tokenizer::Open uses the control-symbol default above, or Plain()).
  static Result<ChatTemplate> Load(const std::string& model_dir);
  std::string ToJson() const;

  // user_prefix + message + user_suffix + assistant_prefix.
  std::string RenderUserTurn(std::string_view message) const;
};

}  // namespace lm2::runtime
