#include "keys.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

#include <openssl/rand.h>

#include "lm2/engine.h"

namespace lm2 {
namespace internal {

Result<std::shared_ptr<persistence::KeyProvider>> ResolveKeyProvider(const EngineOptions& options) {
  if (options.key_provider) return options.key_provider;
  if (!options.key_file.empty()) {
    auto p = persistence::OpenFileKeyProvider(options.key_file);
    if (!p.ok()) {
      if (p.status().IsNotFound()) {
        return Status::PermissionDenied("key file " + options.key_file + " does not exist (lm2::CreateKeyFile makes one)");
      }
      return p.status().WithContext("key file " + options.key_file);
    }
    return std::shared_ptr<persistence::KeyProvider>(std::move(p).value());
  }
  if (!options.key_env.empty()) {
    auto p = persistence::OpenEnvKeyProvider(options.key_env);
    if (p.ok()) return std::shared_ptr<persistence::KeyProvider>(std::move(p).value());
    if (!p.status().IsNotFound()) return p.status().WithContext("environment variable " + options.key_env);
  }
  return Status::PermissionDenied("no encryption key: set EngineOptions.key_file (lm2::CreateKeyFile makes one), "
                                  "key_provider, or the " + (options.key_env.empty() ? std::string("LM2_KEK") : options.key_env) +
                                  " environment variable");
}

}  // namespace internal

Status CreateKeyFile(const std::string& path) {
  unsigned char key[32];
  if (RAND_bytes(key, sizeof key) != 1) return Status::Internal("RAND_bytes failed");
  static const char kHex[] = "0123456789abcdef";
  std::string line = "# lm2 keyring: a master key every tenant's key is derived from. Keep it secret.\n* 1 ";
  for (unsigned char b : key) {
    line.push_back(kHex[b >> 4]);
    line.push_back(kHex[b & 15]);
  }
  line.push_back('\n');
  OPENSSL_cleanse(key, sizeof key);
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) {
    if (errno == EEXIST) return Status::Ok();
    return Status::IOError("creating key file " + path + ": " + std::strerror(errno));
  }
  std::size_t done = 0;
  while (done < line.size()) {
    const ssize_t n = ::write(fd, line.data() + done, line.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      const std::string err = std::strerror(errno);
      ::close(fd);
      ::unlink(path.c_str());
      return Status::IOError("writing key file " + path + ": " + err);
    }
    done += static_cast<std::size_t>(n);
  }
  OPENSSL_cleanse(line.data(), line.size());
  const bool synced = ::fsync(fd) == 0;
  ::close(fd);
  if (!synced) return Status::IOError("fsync of key file " + path + " failed");
  return Status::Ok();
}

}  // namespace lm2
