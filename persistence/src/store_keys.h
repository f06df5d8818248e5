// RocksDB key layout of the session store (private). All integers big-endian so that
// keys sort by number. lp(x) = u32 BE length + bytes, so no id is a prefix of another.
//
//   keys        lp(tenant) lp(session)                 -> wrapped DEK
//   sessions    lp(tenant) lp(session) 'H'             -> sealed Head record
//   sessions    lp(tenant) lp(session) 'V' u64(version) -> sealed VersionInfo record
//   snapshots   lp(tenant) lp(session) u64(version)     -> sealed Snapshot record
//   transcripts lp(tenant) lp(session) u64(version)     -> sealed Transcript record
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace lm2::persistence::keys {

std::string TenantPrefix(std::string_view tenant);
std::string SessionPrefix(std::string_view tenant, std::string_view session);
std::string HeadKey(std::string_view tenant, std::string_view session);
std::string VersionInfoPrefix(std::string_view tenant, std::string_view session);
std::string VersionInfoKey(std::string_view tenant, std::string_view session, uint64_t version);
std::string RecordKey(std::string_view tenant, std::string_view session, uint64_t version);

// The smallest key greater than every key that starts with `prefix`.
std::string PrefixSuccessor(std::string_view prefix);
// The u64 at the end of `key` (a VersionInfo or record key).
uint64_t TrailingVersion(std::string_view key);
// The session id in a keys-CF key of `tenant`; nullopt if malformed.
std::optional<std::string> SessionOfKey(std::string_view tenant, std::string_view key);

}  // namespace lm2::persistence::keys
