#include "lineage.h"

#include <map>

namespace lm2::internal {

std::string KindOf(const persistence::VersionInfo& info) {
  if (info.metadata.count("lm2.fork_of") != 0) return "base";
  auto it = info.metadata.find(kMetaKind);
  return it == info.metadata.end() ? "turn" : it->second;
}

Result<Lineage> LoadLineage(persistence::SessionStore& store, const persistence::SessionId& id, uint64_t head) {
  Lineage out;
  if (head == 0) return out;
  LM2_ASSIGN_OR_RETURN(std::vector<persistence::VersionInfo> all, store.ListVersions(id));
  std::map<uint64_t, const persistence::VersionInfo*> by_version;
  for (const auto& v : all) by_version[v.version] = &v;
  std::vector<persistence::VersionInfo> chain;
  uint64_t at = head;
  while (at != 0) {
    auto it = by_version.find(at);
    if (it == by_version.end()) {
      if (at == head) return Status::NotFound("head version " + std::to_string(head) + " is not in the store");
      out.root_is_base = true;  // retention removed the rest
      break;
    }
    chain.push_back(*it->second);
    at = it->second->parent_version;
  }
  out.versions.assign(chain.rbegin(), chain.rend());
  const persistence::VersionInfo& root = out.versions.front();
  const std::string kind = KindOf(root);
  // A first version is replayable when it is a turn (turn_count 1) or a clear.
  if (!out.root_is_base) {
    out.root_is_base = !((kind == "turn" && root.turn_count == 1) || kind == "clear");
  }
  return out;
}

Status ReplayTurn(const runtime::Model& model, runtime::SequenceState& state,
                  const persistence::TurnTranscript& transcript, Residency& residency) {
  std::vector<int32_t> tokens = transcript.prompt_tokens;
  tokens.insert(tokens.end(), transcript.reply_tokens.begin(), transcript.reply_tokens.end());
  const auto end_segment = [&] { return model.EndSegment(state); };
  if (state.segment_open()) LM2_RETURN_IF_ERROR(residency.Reclaiming(end_segment));
  model.ResetContext(state);
  if (tokens.empty()) return Status::Ok();
  LM2_RETURN_IF_ERROR(residency.Reclaiming(
      [&] { return model.Forward(state, tokens, runtime::LogitsMode::kNone, nullptr); }));
  return residency.Reclaiming(end_segment);
}

}  // namespace lm2::internal
