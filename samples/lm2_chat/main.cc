// lm2-chat: an interactive terminal chat whose memory persists per user.
//
//   lm2-chat --user alice            chat; quit; run again: alice's memory is restored
//
// Each line you type is one turn (your message + the reply = one memory segment, committed
// encrypted to the store). Lines starting with '/' are commands (/help).
#include <sys/stat.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "commands.h"
#include "lm2/engine.h"
#include "sample_common.h"

namespace {

using sample::DefaultModel;
using sample::Exists;

constexpr const char* kUsage =
    "usage: lm2-chat [--user NAME] [options]\n"
    "\n"
    "Chat with an LM2 model whose memory of you persists, encrypted, between runs.\n"
    "\n"
    "  --user NAME        whose memory to use (default: $USER or 'guest')\n"
    "  --session ID       conversation of that user (default: chat)\n"
    "  --model DIR        model directory (default: models/lm2-demo if present, else\n"
    "                     tests/data/models/tiny-lm2, a random test model: gibberish)\n"
    "  --data DIR         store and key file (default: $LM2_DATA_DIR or ~/.local/share/lm2)\n"
    "  --max-tokens N     reply length limit (default 64)\n"
    "  --temperature T    0 = greedy (default 0)\n"
    "  --seed S           sampling seed (default 0)\n"
    "  --quiet            no loading progress or turn statistics\n";

std::string DefaultDataDir() {
  if (const char* d = std::getenv("LM2_DATA_DIR"); d != nullptr && *d != '\0') return d;
  if (const char* h = std::getenv("HOME"); h != nullptr && *h != '\0') return std::string(h) + "/.local/share/lm2";
  return "lm2-data";
}

int MakeDirs(const std::string& path) {
  std::string at;
  for (std::size_t i = 0; i <= path.size(); ++i) {
    if (i == path.size() || path[i] == '/') {
      if (!at.empty() && !Exists(at) && ::mkdir(at.c_str(), 0700) != 0) return -1;
    }
    if (i < path.size()) at.push_back(path[i]);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> a(argv + 1, argv + argc);
  const char* user_env = std::getenv("USER");
  std::string user = user_env != nullptr && *user_env != '\0' ? user_env : "guest";
  std::string session_id = "chat", model, data = DefaultDataDir();
  lm2::ChatOptions chat;
  chat.max_tokens = 64;
  bool quiet = false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const std::string& k = a[i];
    if (k == "--help" || k == "-h") {
      std::printf("%s", kUsage);
      return 0;
    }
    if (k == "--quiet") {
      quiet = true;
      continue;
    }
    if (i + 1 >= a.size()) {
      std::fprintf(stderr, "lm2-chat: missing value after %s\n\n%s", k.c_str(), kUsage);
      return 2;
    }
    const std::string& v = a[++i];
    if (k == "--user") user = v;
    else if (k == "--session") session_id = v;
    else if (k == "--model") model = v;
    else if (k == "--data") data = v;
    else if (k == "--max-tokens") chat.max_tokens = std::atoi(v.c_str());
    else if (k == "--temperature") chat.temperature = std::strtof(v.c_str(), nullptr);
    else if (k == "--seed") chat.seed = std::strtoull(v.c_str(), nullptr, 10);
    else {
      std::fprintf(stderr, "lm2-chat: unknown option %s\n\n%s", k.c_str(), kUsage);
      return 2;
    }
  }
  if (model.empty()) model = DefaultModel();
  if (MakeDirs(data) != 0) {
    std::fprintf(stderr, "lm2-chat: cannot create %s\n", data.c_str());
    return 1;
  }
  lm2::EngineOptions o;
  o.model_dir = model;
  o.store_path = data + "/store";
  o.key_file = data + "/master.key";
  if (!Exists(o.key_file)) {
    if (lm2::Status s = lm2::CreateKeyFile(o.key_file); !s.ok()) {
      std::fprintf(stderr, "lm2-chat: %s\n", s.ToString().c_str());
      return 1;
    }
    std::fprintf(stderr, "created key file %s (mode 0600): it encrypts every user's memory; keep it\n",
                 o.key_file.c_str());
  }
  if (!quiet) {
    std::fprintf(stderr, "loading %s\n", model.c_str());
    o.on_progress = [](std::string_view stage, double f) {
      std::fprintf(stderr, "  [%3.0f%%] %.*s\n", f * 100.0, static_cast<int>(stage.size()), stage.data());
    };
  }
  auto engine = lm2::Engine::Open(o);
  if (!engine.ok()) {
    std::fprintf(stderr, "lm2-chat: %s\n", engine.status().ToString().c_str());
    return 1;
  }
  auto session = (*engine)->OpenSession(user, session_id);
  if (!session.ok()) {
    std::fprintf(stderr, "lm2-chat: %s\n", session.status().ToString().c_str());
    return 1;
  }
  lm2_chat::ChatState st;
  st.engine = engine->get();
  st.session = std::move(session).value();
  const auto& info = (*engine)->model_info();
  std::printf("lm2-chat: model %s (%s, %zu memory layers x %lld slots), user '%s', session '%s'\n", model.c_str(),
              info.backend.c_str(), info.memory_layers.size(), static_cast<long long>(info.memory_slots),
              user.c_str(), session_id.c_str());
  if (st.session->head_version() == 0) {
    std::printf("new session: memory starts empty. /help lists commands.\n");
  } else {
    std::printf("memory restored: %llu turns, at version %llu (/history to see them). /help lists commands.\n",
                static_cast<unsigned long long>(st.session->turn_count()),
                static_cast<unsigned long long>(st.session->head_version()));
  }
  std::string line;
  while (true) {
    std::printf("you> ");
    std::fflush(stdout);
    if (!std::getline(std::cin, line)) {
      std::printf("\n");
      break;
    }
    if (line.empty()) continue;
    if (line[0] == '/') {
      if (!lm2_chat::RunCommand(st, line)) break;
      continue;
    }
    std::printf("lm2> ");
    std::fflush(stdout);
    auto r = st.session->Chat(line, chat, [](std::string_view t) {
      std::fwrite(t.data(), 1, t.size(), stdout);
      std::fflush(stdout);
    });
    std::printf("\n");
    if (!r.ok()) {
      std::printf("error: %s\n", r.status().ToString().c_str());
      if (r.status().IsConflict()) std::printf("(another process chatted in this session: /reload, then resend)\n");
      continue;
    }
    if (!quiet) {
      std::fprintf(stderr, "[v%llu: %lld prompt + %lld reply tokens, %.0f ms, committed in %.1f ms]\n",
                   static_cast<unsigned long long>(r->version), static_cast<long long>(r->prompt_tokens),
                   static_cast<long long>(r->reply_tokens), (r->prefill_seconds + r->decode_seconds) * 1e3,
                   r->commit_seconds * 1e3);
    }
    st.last = std::move(r).value();
    st.has_last = true;
  }
  return 0;
}
