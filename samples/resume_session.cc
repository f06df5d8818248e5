// resume_session: tell the model a fact, exit; run again in a new process and ask.
//
//   resume_session --tell "Mary went to the kitchen."     (first run: a fresh session)
//   resume_session --ask "Where is Mary?"                 (second run: memory restored)
//
// Options: --model DIR, --data DIR (store + key file, default ./lm2-sample-data),
// --user NAME (default demo). With the shipped demo model the second run answers from
// memory; with the random test model the text is gibberish, but the memory digest
// printed by both runs shows the bank came back bit for bit.
#include <cstdio>

#include "sample_common.h"

int main(int argc, char** argv) {
  const auto args = sample::ParseArgs(argc, argv);
  const bool tell = args.count("tell") != 0, ask = args.count("ask") != 0;
  if (tell == ask) {
    std::fprintf(stderr, "usage: resume_session --tell TEXT | --ask TEXT [--model DIR] [--data DIR] [--user NAME]\n");
    return 2;
  }
  auto engine = sample::OpenEngine(args);
  const std::string user = sample::Get(args, "user", "demo");
  lm2::ChatOptions co;
  co.max_tokens = 32;
  if (tell) {
    sample::Check(engine->EraseSession(user, "resume-demo"));  // start fresh
    auto s = sample::Must(engine->OpenSession(user, "resume-demo"));
    auto r = sample::Must(s->Chat(args.at("tell"), co));
    std::printf("told: %s\nreply: %s\n", args.at("tell").c_str(), r.text.c_str());
    std::printf("committed version %llu; memory digest %.6f\n", static_cast<unsigned long long>(r.version),
                sample::NormDigest(*s));
    std::printf("now run: resume_session --ask \"<question>\"\n");
    return 0;
  }
  lm2::SessionOptions so;
  so.create_if_missing = false;
  auto opened = engine->OpenSession(user, "resume-demo", so);
  if (!opened.ok()) {
    std::fprintf(stderr, "%s\n(run resume_session --tell TEXT first)\n", opened.status().ToString().c_str());
    return 1;
  }
  auto s = std::move(opened).value();
  std::printf("resumed at version %llu (%llu turns); memory digest %.6f\n",
              static_cast<unsigned long long>(s->head_version()), static_cast<unsigned long long>(s->turn_count()),
              sample::NormDigest(*s));
  auto r = sample::Must(s->Chat(args.at("ask"), co));
  std::printf("asked: %s\nreply: %s\n", args.at("ask").c_str(), r.text.c_str());
  return 0;
}
