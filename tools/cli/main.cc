// lm2: the command-line tool. `lm2 COMMAND [ARGS...]`; see `lm2 --help`.
#include <cstdio>
#include <string>
#include <vector>

#include "commands.h"

namespace lm2::cli {

const std::vector<const Command*>& AllCommands() {
  static const std::vector<const Command*> kAll = {&kGenerateCommand, &kInspectCommand};
  return kAll;
}

namespace {

const Command* Find(std::string_view name) {
  for (const Command* c : AllCommands()) {
    if (c->name == name) return c;
  }
  return nullptr;
}

void PrintHelp(std::FILE* out) {
  std::fprintf(out,
               "lm2: run LM2 large-memory language models.\n\n"
               "usage: lm2 COMMAND [ARGS...]\n"
               "       lm2 help COMMAND     details of one command\n\n"
               "commands:\n");
  for (const Command* c : AllCommands()) {
    std::fprintf(out, "  %-12.*s %.*s\n", static_cast<int>(c->name.size()), c->name.data(),
                 static_cast<int>(c->summary.size()), c->summary.data());
  }
  std::fprintf(out, "\nexit status: 0 success, 1 the command failed (message on stderr), 2 bad arguments\n");
}

void PrintUsage(const Command& c, std::FILE* out) {
  std::fprintf(out, "%.*s", static_cast<int>(c.usage.size()), c.usage.data());
}

}  // namespace
}  // namespace lm2::cli

int main(int argc, char** argv) {
  using namespace lm2::cli;
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) {
    PrintHelp(stderr);
    return kExitUsage;
  }
  const std::string& first = args[0];
  if (first == "--help" || first == "-h") {
    PrintHelp(stdout);
    return kExitOk;
  }
  if (first == "help") {
    if (args.size() == 1) {
      PrintHelp(stdout);
      return kExitOk;
    }
    const Command* c = Find(args[1]);
    if (c == nullptr) {
      std::fprintf(stderr, "lm2: unknown command '%s'\n\n", args[1].c_str());
      PrintHelp(stderr);
      return kExitUsage;
    }
    PrintUsage(*c, stdout);
    return kExitOk;
  }
  const Command* c = Find(first);
  if (c == nullptr) {
    std::fprintf(stderr, "lm2: unknown command '%s'\n\n", first.c_str());
    PrintHelp(stderr);
    return kExitUsage;
  }
  std::vector<std::string> rest(args.begin() + 1, args.end());
  for (const std::string& a : rest) {
    if (a == "--help" || a == "-h") {
      PrintUsage(*c, stdout);
      return kExitOk;
    }
  }
  return c->run(rest);
}
