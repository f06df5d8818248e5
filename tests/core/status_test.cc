#include <catch2/catch.hpp>

#include <memory>
#include <string>

#include "lm2/core/status.h"

using lm2::Result;
using lm2::Status;
using lm2::StatusCode;

TEST_CASE("Status: OK is the default and carries no message", "[core]") {
  Status s;
  CHECK(s.ok());
  CHECK(s.code() == StatusCode::kOk);
  CHECK(s.message().empty());
  CHECK(s.ToString() == "OK");
  // A code of OK with a message is still plain OK: there is no "OK with error text".
  Status t(StatusCode::kOk, "ignored");
  CHECK(t.ok());
  CHECK(t.message().empty());
}

TEST_CASE("Status: codes, names and messages", "[core]") {
  Status s = Status::Corruption("bad header");
  CHECK_FALSE(s.ok());
  CHECK(s.IsCorruption());
  CHECK_FALSE(s.IsNotFound());
  CHECK(s.code() == StatusCode::kCorruption);
  CHECK(s.message() == "bad header");
  CHECK(s.ToString() == "Corruption: bad header");
  CHECK(Status::Conflict("x").IsConflict());
  CHECK(Status::PermissionDenied("x").IsPermissionDenied());
  CHECK(Status::InvalidArgument("x").IsInvalidArgument());
  CHECK(lm2::StatusCodeName(StatusCode::kFailedPrecondition) == "FailedPrecondition");
  // Numeric values cross the C ABI: they must never change.
  CHECK(static_cast<int>(StatusCode::kInvalidArgument) == 1);
  CHECK(static_cast<int>(StatusCode::kConflict) == 5);
  CHECK(static_cast<int>(StatusCode::kInternal) == 14);
}

TEST_CASE("Status: copies are deep and context prefixes the message", "[core]") {
  Status a = Status::NotFound("session 7");
  Status b = a;
  Status c = b.WithContext("open");
  CHECK(b.ToString() == "NotFound: session 7");
  CHECK(c.ToString() == "NotFound: open: session 7");
  CHECK(a.message() == "session 7");
  b = Status::Ok();
  CHECK(b.ok());
  CHECK(a.IsNotFound());
  CHECK(Status::Ok().WithContext("ctx").ok());
}

namespace {
Result<int> Parse(const std::string& s) {
  if (s.empty()) return Status::InvalidArgument("empty");
  return std::stoi(s);
}
Result<int> Doubled(const std::string& s) {
  LM2_ASSIGN_OR_RETURN(int v, Parse(s));
  return 2 * v;
}
Status Check(int v) {
  if (v < 0) return Status::OutOfRange("negative");
  return Status::Ok();
}
Status CheckAll(int a, int b) {
  LM2_RETURN_IF_ERROR(Check(a));
  LM2_RETURN_IF_ERROR(Check(b));
  return Status::Ok();
}
}  // namespace

TEST_CASE("Result: value or status, and the propagation macros", "[core]") {
  Result<int> r = Doubled("21");
  REQUIRE(r.ok());
  CHECK(*r == 42);
  CHECK(r.status().ok());

  Result<int> e = Doubled("");
  REQUIRE_FALSE(e.ok());
  CHECK(e.status().IsInvalidArgument());
  CHECK(e.status().message() == "empty");

  CHECK(CheckAll(1, 2).ok());
  CHECK(CheckAll(1, -2).code() == StatusCode::kOutOfRange);

  // A Result built from an OK status is a bug, reported as Internal rather than UB.
  Result<int> bad{Status::Ok()};
  CHECK_FALSE(bad.ok());
  CHECK(bad.status().code() == StatusCode::kInternal);

  // Move-only payloads work.
  Result<std::unique_ptr<int>> p = std::make_unique<int>(5);
  REQUIRE(p.ok());
  std::unique_ptr<int> owned = std::move(p).value();
  CHECK(*owned == 5);
}
