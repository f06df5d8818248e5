#include "store_keys.h"

namespace lm2::persistence::keys {
namespace {

void AppendBe(std::string* s, uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void AppendLp(std::string* s, std::string_view v) {
  AppendBe(s, v.size(), 4);
  s->append(v);
}

}  // namespace

std::string TenantPrefix(std::string_view tenant) {
  std::string k;
  AppendLp(&k, tenant);
  return k;
}

std::string SessionPrefix(std::string_view tenant, std::string_view session) {
  std::string k = TenantPrefix(tenant);
  AppendLp(&k, session);
  return k;
}

std::string HeadKey(std::string_view tenant, std::string_view session) {
  return SessionPrefix(tenant, session) + 'H';
}

std::string VersionInfoPrefix(std::string_view tenant, std::string_view session) {
  return SessionPrefix(tenant, session) + 'V';
}

std::string VersionInfoKey(std::string_view tenant, std::string_view session, uint64_t version) {
  std::string k = VersionInfoPrefix(tenant, session);
  AppendBe(&k, version, 8);
  return k;
}

std::string RecordKey(std::string_view tenant, std::string_view session, uint64_t version) {
  std::string k = SessionPrefix(tenant, session);
  AppendBe(&k, version, 8);
  return k;
}

std::string PrefixSuccessor(std::string_view prefix) {
  std::string s(prefix);
  while (!s.empty() && static_cast<uint8_t>(s.back()) == 0xff) s.pop_back();
  if (s.empty()) return std::string(prefix) + std::string(64, '\xff');  // not reached: lp() starts with a zero byte
  s.back() = static_cast<char>(static_cast<uint8_t>(s.back()) + 1);
  return s;
}

uint64_t TrailingVersion(std::string_view key) {
  uint64_t v = 0;
  if (key.size() < 8) return 0;
  for (std::size_t i = key.size() - 8; i < key.size(); ++i) v = (v << 8) | static_cast<uint8_t>(key[i]);
  return v;
}

std::optional<std::string> SessionOfKey(std::string_view tenant, std::string_view key) {
  const std::string tp = TenantPrefix(tenant);
  if (key.size() < tp.size() + 4 || key.substr(0, tp.size()) != tp) return std::nullopt;
  std::string_view rest = key.substr(tp.size());
  uint64_t n = 0;
  for (int i = 0; i < 4; ++i) n = (n << 8) | static_cast<uint8_t>(rest[static_cast<std::size_t>(i)]);
  if (rest.size() != 4 + n) return std::nullopt;
  return std::string(rest.substr(4));
}

}  // namespace lm2::persistence::keys
