// lm2-chat's slash commands (/history, /rollback, /forget, /clear, /slots, ...).
#pragma once

#include <string>

#include "lm2/engine.h"

namespace lm2_chat {

struct ChatState {
  lm2::Engine* engine = nullptr;
  std::unique_ptr<lm2::Session> session;
  lm2::ChatResult last;  // the last turn (for /slots)
  bool has_last = false;
};

// Runs `line` (starting with '/'). Returns false when the user asked to quit.
bool RunCommand(ChatState& st, const std::string& line);

void PrintHelp();

}  // namespace lm2_chat
