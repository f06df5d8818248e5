// sdk_test_child: the other process of the SDK's resume and concurrency tests.
//
//   chat   MODEL STORE KEYS TENANT SESSION MSG...       one turn per MSG (8 tokens max)
//   race   MODEL STORE KEYS TENANT SESSION N TAG        N turns "TAG i", Reload+retry on Conflict
//   dump   MODEL STORE KEYS TENANT SESSION OUT MSG      resume; write the bank and the
//                                                       next-token logits for MSG to OUT
// Exit 0 on success; prints "conflicts K" for race.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "lm2/engine.h"

namespace {

int Fail(const lm2::Status& s) {
  std::fprintf(stderr, "child: %s\n", s.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 7) return 2;
  const std::string mode = argv[1];
  lm2::EngineOptions o;
  o.model_dir = argv[2];
  o.store_path = argv[3];
  o.key_file = argv[4];
  o.key_env = "";
  o.share_store_between_processes = true;
  o.sync_commits = false;
  o.backend = lm2::Backend::kCpu;  // as the parent (sdk_test_util.h)
  auto engine = lm2::Engine::Open(o);
  if (!engine.ok()) return Fail(engine.status());
  auto session = (*engine)->OpenSession(argv[5], argv[6]);
  if (!session.ok()) return Fail(session.status());
  lm2::Session& s = **session;
  lm2::ChatOptions co;
  co.max_tokens = 8;
  if (mode == "chat") {
    for (int i = 7; i < argc; ++i) {
      auto r = s.Chat(argv[i], co);
      if (!r.ok()) return Fail(r.status());
    }
    std::printf("head %llu\n", static_cast<unsigned long long>(s.head_version()));
    return 0;
  }
  if (mode == "race" && argc == 9) {
    const int n = std::atoi(argv[7]);
    int conflicts = 0;
    for (int i = 0; i < n; ++i) {
      const std::string msg = std::string(argv[8]) + " " + std::to_string(i);
      // Conflict: the other process committed first; Unavailable: it holds the store's
      // lock past the open timeout (a loaded machine). Both mean reload and try again.
      int unavailable = 0;
      const auto retryable = [&](const lm2::Status& st) {
        if (st.code() != lm2::StatusCode::kUnavailable) return false;
        return ++unavailable <= 20;
      };
      while (true) {
        auto r = s.Chat(msg, co);
        if (r.ok()) break;
        if (r.status().IsConflict()) {
          ++conflicts;
        } else if (!retryable(r.status())) {
          return Fail(r.status());
        }
        lm2::Status st = s.Reload();
        while (!st.ok() && retryable(st)) st = s.Reload();
        if (!st.ok()) return Fail(st);
      }
    }
    std::printf("conflicts %d\n", conflicts);
    return 0;
  }
  if (mode == "dump" && argc == 9) {
    auto mem = s.Memory();
    if (!mem.ok()) return Fail(mem.status());
    auto logits = s.NextTokenLogits(argv[8]);
    if (!logits.ok()) return Fail(logits.status());
    FILE* f = std::fopen(argv[7], "wb");
    if (f == nullptr) return 3;
    for (const auto& l : mem->layers) std::fwrite(l.data.data(), sizeof(float), l.data.size(), f);
    std::fwrite(logits->data(), sizeof(float), logits->size(), f);
    std::fclose(f);
    return 0;
  }
  return 2;
}
