// lm2::Status and lm2::Result<T>: the error channel of all library code.
//
// A Status is either OK (no allocation, one null pointer) or carries a code a caller can
// branch on plus a human-readable message. Result<T> holds either a T or a non-OK Status.
// Both are [[nodiscard]]: an ignored error is a compile warning. Nothing in lm2 throws
// across a public API; functions that can fail return one of these.
//
// Thread-safety: values; copying is cheap when OK and one allocation otherwise.
#pragma once

#include <cassert>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace lm2 {

// Stable numeric values: they cross the C ABI and appear in Python exceptions.
enum class StatusCode : int {
  kOk = 0,
  kInvalidArgument = 1,    // the caller passed something malformed or out of range
  kNotFound = 2,           // a session, version, file or tensor that does not exist
  kAlreadyExists = 3,      // creating something that is already there
  kCorruption = 4,         // stored or loaded bytes fail validation or authentication
  kConflict = 5,           // a concurrent writer moved the head first (compare-and-set lost)
  kPermissionDenied = 6,   // missing or wrong key, or a record bound to another owner
  kFailedPrecondition = 7, // valid input, wrong state (e.g. memory bank from another model)
  kOutOfRange = 8,         // e.g. a prompt longer than the context
  kResourceExhausted = 9,  // out of memory or another bounded resource
  kUnavailable = 10,       // a device or service cannot be reached right now
  kCancelled = 11,         // the caller asked to stop
  kUnimplemented = 12,     // a valid request this build does not support
  kIOError = 13,           // the operating system refused a read or write
  kInternal = 14,          // a broken invariant inside lm2: a bug
};

// "OK", "InvalidArgument", ...: the name of a code, for messages and bindings.
std::string_view StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  Status(StatusCode code, std::string_view message);

  Status(const Status& other);
  Status& operator=(const Status& other);
  Status(Status&&) noexcept = default;
  Status& operator=(Status&&) noexcept = default;
  ~Status() = default;

  static Status Ok() { return Status(); }
  static Status InvalidArgument(std::string_view msg) { return {StatusCode::kInvalidArgument, msg}; }
  static Status NotFound(std::string_view msg) { return {StatusCode::kNotFound, msg}; }
  static Status AlreadyExists(std::string_view msg) { return {StatusCode::kAlreadyExists, msg}; }
  static Status Corruption(std::string_view msg) { return {StatusCode::kCorruption, msg}; }
  static Status Conflict(std::string_view msg) { return {StatusCode::kConflict, msg}; }
  static Status PermissionDenied(std::string_view msg) { return {StatusCode::kPermissionDenied, msg}; }
  static Status FailedPrecondition(std::string_view msg) { return {StatusCode::kFailedPrecondition, msg}; }
  static Status OutOfRange(std::string_view msg) { return {StatusCode::kOutOfRange, msg}; }
  static Status ResourceExhausted(std::string_view msg) { return {StatusCode::kResourceExhausted, msg}; }
  static Status Unavailable(std::string_view msg) { return {StatusCode::kUnavailable, msg}; }
  static Status Cancelled(std::string_view msg) { return {StatusCode::kCancelled, msg}; }
  static Status Unimplemented(std::string_view msg) { return {StatusCode::kUnimplemented, msg}; }
  static Status IOError(std::string_view msg) { return {StatusCode::kIOError, msg}; }
  static Status Internal(std::string_view msg) { return {StatusCode::kInternal, msg}; }

  bool ok() const { return rep_ == nullptr; }
  StatusCode code() const { return rep_ ? rep_->code : StatusCode::kOk; }
  // Empty when OK.
  std::string_view message() const { return rep_ ? std::string_view(rep_->message) : std::string_view(); }
  // "OK" or "<CodeName>: <message>".
  std::string ToString() const;

  // Returns a copy whose message is "<context>: <message>"; OK stays OK.
  Status WithContext(std::string_view context) const;

  bool IsNotFound() const { return code() == StatusCode::kNotFound; }
  bool IsCorruption() const { return code() == StatusCode::kCorruption; }
  bool IsConflict() const { return code() == StatusCode::kConflict; }
  bool IsInvalidArgument() const { return code() == StatusCode::kInvalidArgument; }
  bool IsPermissionDenied() const { return code() == StatusCode::kPermissionDenied; }

 private:
  struct Rep {
    StatusCode code;
    std::string message;
  };
  std::unique_ptr<Rep> rep_;  // null == OK
};

// Result<T>: a T, or the non-OK Status that explains why there is none.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : value_(std::move(value)) {}  // NOLINT(google-explicit-constructor)
  Result(Status status) : status_(std::move(status)) {  // NOLINT(google-explicit-constructor)
    if (status_.ok()) status_ = Status::Internal("Result constructed from an OK status without a value");
  }

  bool ok() const { return value_.has_value(); }
  const Status& status() const { return status_; }  // OK when a value is held

  // Precondition: ok(). Checked in debug builds.
  T& value() & { assert(ok()); return *value_; }
  const T& value() const& { assert(ok()); return *value_; }
  T&& value() && { assert(ok()); return std::move(*value_); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  Status status_;
  std::optional<T> value_;
};

}  // namespace lm2

// Propagate a non-OK Status to the caller.
#define LM2_RETURN_IF_ERROR(expr)                 \
  do {                                            \
    ::lm2::Status lm2_status_ = (expr);           \
    if (!lm2_status_.ok()) return lm2_status_;    \
  } while (0)

#define LM2_CONCAT_INNER_(a, b) a##b
#define LM2_CONCAT_(a, b) LM2_CONCAT_INNER_(a, b)
// `LM2_ASSIGN_OR_RETURN(auto x, MakeX());` binds the value or returns the Status.
#define LM2_ASSIGN_OR_RETURN(lhs, expr) LM2_ASSIGN_OR_RETURN_IMPL_(LM2_CONCAT_(lm2_result_, __LINE__), lhs, expr)
#define LM2_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                               \
  if (!tmp.ok()) return tmp.status();              \
  lhs = std::move(tmp).value()
