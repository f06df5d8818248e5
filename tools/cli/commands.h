// The subcommands of the `lm2` tool. To add one: write NAME_command.cc defining a
// `const Command kNameCommand`, declare it below, list it in AllCommands() (main.cc)
// and add the file to tools/cli/CMakeLists.txt.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace lm2::cli {

// Exit codes shared by every command.
inline constexpr int kExitOk = 0;
inline constexpr int kExitError = 1;  // the command failed: a Status message went to stderr
inline constexpr int kExitUsage = 2;  // bad arguments: usage went to stderr

struct Command {
  std::string_view name;     // "inspect"
  std::string_view summary;  // one line for `lm2 --help`
  std::string_view usage;    // full text for `lm2 help NAME` and `lm2 NAME --help`
  // Runs with the arguments after the command name; returns an exit code.
  int (*run)(const std::vector<std::string>& args);
};

extern const Command kGenerateCommand;
extern const Command kInspectCommand;

// Every command, in the order `lm2 --help` lists them.
const std::vector<const Command*>& AllCommands();

}  // namespace lm2::cli
