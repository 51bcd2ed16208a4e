// Test helpers that run the oracle tools (qemu-img, qemu-io) through the shell; test thread.
#pragma once
#include <stdio.h>
#include <sys/wait.h>

#include <string>

namespace blockd::test {

// Runs a shell command; returns its stdout (stderr folded in when `with_err`) and sets `rc`.
inline std::string sh(const std::string& cmd, int* rc = nullptr, bool with_err = false) {
  std::string full = cmd + (with_err ? " 2>&1" : " 2>/dev/null");
  FILE* f = popen(full.c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while (f && (n = fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
  int st = f ? pclose(f) : -1;
  if (rc) *rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return out;
}

inline bool have_qemu_tools() {
  int rc = 0;
  sh("command -v qemu-img && command -v qemu-io", &rc);
  return rc == 0;
}

}  // namespace blockd::test
