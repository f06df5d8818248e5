#include "commands.h"

#include <algorithm>
#include <cstdio>
#include <ctime>
#include <numeric>
#include <sstream>
#include <vector>

namespace lm2_chat {
namespace {

void Say(const lm2::Status& s) {
  if (s.ok()) return;
  std::printf("error: %s\n", s.ToString().c_str());
}

bool ParseU64(const std::string& s, uint64_t* out) {
  if (s.empty() || s.find_first_not_of("0123456789") != std::string::npos) return false;
  *out = std::stoull(s);
  return true;
}

std::vector<int64_t> ParseList(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ',')) {
    if (!item.empty() && item.find_first_not_of("0123456789") == std::string::npos) out.push_back(std::stoll(item));
  }
  return out;
}

// "7:1.23 2:0.98 ..." for the k largest values of a layer.
std::string Top(const std::vector<float>& v, std::size_t k) {
  std::vector<std::size_t> idx(v.size());
  std::iota(idx.begin(), idx.end(), 0);
  k = std::min(k, idx.size());
  std::partial_sort(idx.begin(), idx.begin() + static_cast<std::ptrdiff_t>(k), idx.end(),
                    [&](std::size_t a, std::size_t b) { return v[a] > v[b]; });
  std::string out;
  char buf[48];
  for (std::size_t i = 0; i < k; ++i) {
    std::snprintf(buf, sizeof buf, "%s%zu:%.3f", i ? " " : "", idx[i], static_cast<double>(v[idx[i]]));
    out += buf;
  }
  return out;
}

void History(ChatState& st) {
  auto h = st.session->History();
  if (!h.ok()) return Say(h.status());
  if (h->empty()) std::printf("(no turns yet)\n");
  for (const auto& e : *h) {
    const std::time_t t = static_cast<std::time_t>(e.created_unix_ms / 1000);
    char when[32];
    std::strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", std::localtime(&t));
    std::printf("%s v%-3llu %-6s %s  [%lld+%lld tokens]  %s\n", e.is_head ? "*" : " ",
                static_cast<unsigned long long>(e.version), e.kind.c_str(), when,
                static_cast<long long>(e.prompt_tokens), static_cast<long long>(e.reply_tokens), e.preview.c_str());
  }
}

void Slots(ChatState& st) {
  auto norms = st.session->SlotNorms();
  if (!norms.ok()) return Say(norms.status());
  std::printf("slot norms (top 5 per layer, slot:norm):\n");
  for (const auto& l : *norms) std::printf("  layer %d: %s\n", l.layer, Top(l.values, 5).c_str());
  if (!st.has_last) return;
  std::printf("last turn (v%llu) wrote most to:\n", static_cast<unsigned long long>(st.last.version));
  for (const auto& l : st.last.slot_writes) std::printf("  layer %d: %s\n", l.layer, Top(l.values, 5).c_str());
  std::printf("its reply read most from:\n");
  for (const auto& l : st.last.slot_reads) std::printf("  layer %d: %s\n", l.layer, Top(l.values, 5).c_str());
}

void Clear(ChatState& st, std::istringstream& args) {
  lm2::ClearSpec spec;
  std::string what;
  while (args >> what) {
    std::string val;
    if (what == "all") continue;
    if (!(args >> val)) {
      std::printf("usage: /clear [all] | [layer L[,L..]] [slots S[,S..]]\n");
      return;
    }
    if (what == "layer" || what == "layers") {
      for (int64_t l : ParseList(val)) spec.layers.push_back(static_cast<int32_t>(l));
    } else if (what == "slot" || what == "slots") {
      spec.slots = ParseList(val);
    } else {
      std::printf("usage: /clear [all] | [layer L[,L..]] [slots S[,S..]]\n");
      return;
    }
  }
  lm2::Status s = st.session->ClearMemory(spec);
  if (s.ok()) {
    std::printf("cleared; now at v%llu\n", static_cast<unsigned long long>(st.session->head_version()));
    st.has_last = false;
  }
  Say(s);
}

}  // namespace

void PrintHelp() {
  std::printf(
      "commands:\n"
      "  /history                 versions of this session (* = current)\n"
      "  /rollback V              go back to version V\n"
      "  /forget V                forget turn V exactly (later turns are replayed without it)\n"
      "  /clear [all]             reset the whole memory to its initial value\n"
      "  /clear layer L slots S   reset chosen layers and/or slots (comma lists)\n"
      "  /slots                   slot norms; what the last turn wrote and read\n"
      "  /show V                  the transcript of turn V\n"
      "  /fork V NAME             copy version V into a new session NAME\n"
      "  /erase                   erase this session from the store\n"
      "  /reload                  re-read the head (after another process chatted)\n"
      "  /help, /quit\n");
}

bool RunCommand(ChatState& st, const std::string& line) {
  std::istringstream in(line);
  std::string cmd, arg;
  in >> cmd;
  uint64_t v = 0;
  if (cmd == "/quit" || cmd == "/exit") return false;
  if (cmd == "/help") {
    PrintHelp();
  } else if (cmd == "/history") {
    History(st);
  } else if (cmd == "/slots") {
    Slots(st);
  } else if (cmd == "/clear") {
    Clear(st, in);
  } else if (cmd == "/reload") {
    Say(st.session->Reload());
    std::printf("at v%llu\n", static_cast<unsigned long long>(st.session->head_version()));
  } else if (cmd == "/erase") {
    lm2::Status s = st.session->Erase();
    Say(s);
    if (s.ok()) {
      std::printf("session erased\n");
      return false;
    }
  } else if ((cmd == "/rollback" || cmd == "/forget" || cmd == "/show" || cmd == "/fork") && (in >> arg) &&
             ParseU64(arg, &v)) {
    if (cmd == "/rollback") {
      lm2::Status s = st.session->Rollback(v);
      if (s.ok()) std::printf("rolled back to v%llu\n", static_cast<unsigned long long>(v));
      Say(s);
    } else if (cmd == "/forget") {
      lm2::Status s = st.session->ForgetTurn(v);
      if (s.ok()) {
        std::printf("forgot turn v%llu; now at v%llu\n", static_cast<unsigned long long>(v),
                    static_cast<unsigned long long>(st.session->head_version()));
      }
      Say(s);
    } else if (cmd == "/show") {
      auto t = st.session->Turn(v);
      if (!t.ok()) return Say(t.status()), true;
      std::printf("you> %s\nlm2> %s\n", t->user_text.c_str(), t->reply_text.c_str());
    } else {
      std::string name;
      if (!(in >> name)) {
        std::printf("usage: /fork V NAME\n");
        return true;
      }
      auto f = st.session->Fork(v, name);
      if (f.ok()) std::printf("forked v%llu into session '%s'\n", static_cast<unsigned long long>(v), name.c_str());
      else Say(f.status());
    }
  } else {
    std::printf("unknown command or missing argument: %s (try /help)\n", line.c_str());
  }
  return true;
}

}  // namespace lm2_chat
