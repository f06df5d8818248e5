// Spawning persistence_test_child from tests.
#pragma once

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "test_util.h"

namespace lm2::persistence::test {

// The hex of KeyOf(7), the KEK of MakeKeys(): children read it from LM2_KEK.
inline std::string TestKekHex() {
  SecretBytes k = KeyOf(7);
  std::string hex;
  char buf[3];
  for (std::size_t i = 0; i < k.size(); ++i) {
    std::snprintf(buf, sizeof buf, "%02x", k.data()[i]);
    hex += buf;
  }
  return hex;
}

struct Child {
  pid_t pid = -1;
  int out = -1;  // read end of the child's stdout
};

inline Child SpawnChild(const std::vector<std::string>& args) {
  int fds[2];
  if (::pipe(fds) != 0) throw std::runtime_error("pipe");
  ::setenv("LM2_KEK", TestKekHex().c_str(), 1);
  // Everything the child needs is built before fork: only async-signal-safe calls after.
  std::string exe = LM2_PERSIST_CHILD;
  std::vector<std::string> copy = args;
  std::vector<char*> argv;
  argv.push_back(exe.data());
  for (auto& a : copy) argv.push_back(a.data());
  argv.push_back(nullptr);
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork");
  if (pid == 0) {
    ::dup2(fds[1], 1);
    ::close(fds[0]);
    ::close(fds[1]);
    ::execv(exe.c_str(), argv.data());
    std::_Exit(127);
  }
  ::close(fds[1]);
  return {pid, fds[0]};
}

// Reads until a full line is available (or EOF); returns it without '\n', "" at EOF.
inline std::string ReadLine(int fd, std::string* buffer) {
  for (;;) {
    auto nl = buffer->find('\n');
    if (nl != std::string::npos) {
      std::string line = buffer->substr(0, nl);
      buffer->erase(0, nl + 1);
      return line;
    }
    char tmp[4096];
    const ssize_t n = ::read(fd, tmp, sizeof tmp);
    if (n <= 0) return "";
    buffer->append(tmp, static_cast<std::size_t>(n));
  }
}

inline std::vector<std::string> ReadAllLines(int fd, std::string buffer = {}) {
  std::vector<std::string> lines;
  for (std::string l = ReadLine(fd, &buffer); !l.empty(); l = ReadLine(fd, &buffer)) lines.push_back(l);
  return lines;
}

inline int WaitChild(pid_t pid) {
  int status = 0;
  ::waitpid(pid, &status, 0);
  return status;
}

}  // namespace lm2::persistence::test
