// Replays fuzz inputs (seed corpus, saved crashes) through a fuzz entry point without libFuzzer, one child process per input; main thread.
//
// Usage: <tool> [--no-fork] [--timeout SECONDS] [--memory MIB] PATH...
// Each PATH is a file or a directory (its regular files, sorted). Every input runs in its own
// child process, so one crash does not hide the others; a child that dies by a signal, exits
// non-zero or runs past the timeout (10 s) is a failure. The child's memory is capped too (its
// address space at 2048 MiB, or under ASan its RSS at 2048 MiB), so an input that makes the code
// under test allocate without bound fails here as it does under libFuzzer's -rss_limit_mb. Exit
// status: 0 when every input passed.
#pragma once
#include <dirent.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define BLOCKD_REGRESS_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define BLOCKD_REGRESS_ASAN 1
#endif
#endif

namespace blockd::fuzz {
namespace regress_detail {

// The replayer's name for its messages (set by regress_main).
inline const char*& tool_name() {
  static const char* name = "fuzz_regress";
  return name;
}
inline const char* tool() { return tool_name(); }


inline std::vector<uint8_t> slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

inline void collect(const std::string& path, std::vector<std::string>& out) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    std::fprintf(stderr, "%s: %s: %s\n", tool(), path.c_str(), std::strerror(errno));
    std::exit(2);
  }
  if (!S_ISDIR(st.st_mode)) {
    out.push_back(path);
    return;
  }
  std::vector<std::string> names;
  if (DIR* d = ::opendir(path.c_str())) {
    while (dirent* e = ::readdir(d)) {
      std::string n = e->d_name;
      if (n == "." || n == ".." || n[0] == '.' || n.ends_with(".md") || n.ends_with(".txt")) continue;
      std::string full = path + "/" + n;
      struct stat s2 {};
      if (::stat(full.c_str(), &s2) == 0 && S_ISREG(s2.st_mode)) names.push_back(full);
    }
    ::closedir(d);
  }
  std::sort(names.begin(), names.end());
  out.insert(out.end(), names.begin(), names.end());
}

// Under ASan (which reserves terabytes of address space up front) the child's memory cap is a
// watchdog thread that aborts once the resident set passes `mib`, as libFuzzer's -rss_limit_mb does.
[[maybe_unused]] inline void start_rss_watchdog(long mib) {
  std::thread([mib] {
    long page_kib = ::sysconf(_SC_PAGESIZE) / 1024;
    for (;;) {
      long size = 0, resident = 0;
      if (FILE* f = std::fopen("/proc/self/statm", "r")) {
        if (std::fscanf(f, "%ld %ld", &size, &resident) != 2) resident = 0;
        std::fclose(f);
      }
      if (resident * page_kib > mib * 1024) {
        std::fprintf(stderr, "%s: resident set %ld MiB passed the %ld MiB limit\n", tool(),
                     resident * page_kib / 1024, mib);
        std::abort();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }).detach();
}

}  // namespace regress_detail

// The replayer's main: `run_one` runs one input in this process (printing a line about it),
// `after_child` cleans up after a child process (scratch files named by its pid), may be empty.
inline int regress_main(int argc, char** argv, const char* tool, void (*run_one)(const std::string& path),
                        void (*after_child)(int pid)) {
  using namespace regress_detail;
  tool_name() = tool;
  bool fork_each = true;
  int timeout = 10;
  long memory_mib = 2048;
  std::vector<std::string> inputs;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--no-fork") fork_each = false;
    else if (a == "--timeout" && i + 1 < argc) timeout = std::atoi(argv[++i]);
    else if (a == "--memory" && i + 1 < argc) memory_mib = std::atol(argv[++i]);
    else collect(a, inputs);
  }
  if (inputs.empty()) {
    std::fprintf(stderr, "usage: %s [--no-fork] [--timeout SECONDS] [--memory MIB] PATH...\n", argv[0]);
    return 2;
  }
  std::vector<std::string> failed;
  for (auto& in : inputs) {
    if (!fork_each) {
      run_one(in);
      continue;
    }
    std::fflush(stdout);
    pid_t pid = ::fork();
    if (pid == 0) {
      ::alarm(unsigned(timeout));
#ifdef BLOCKD_REGRESS_ASAN
      start_rss_watchdog(memory_mib);
#else
      struct rlimit rl {};
      rl.rlim_cur = rl.rlim_max = rlim_t(memory_mib) << 20;
      ::setrlimit(RLIMIT_AS, &rl);
#endif
      run_one(in);
      std::exit(0);
    }
    int st = 0;
    ::waitpid(pid, &st, 0);
    if (after_child) after_child(int(pid));
    if (WIFEXITED(st) && WEXITSTATUS(st) == 0) continue;
    std::string why = WIFSIGNALED(st) ? (WTERMSIG(st) == SIGALRM ? "timed out" : std::string("killed by signal ") +
                                                                                   strsignal(WTERMSIG(st)))
                                      : "exit status " + std::to_string(WEXITSTATUS(st));
    std::printf("FAIL %s: %s\n", in.c_str(), why.c_str());
    failed.push_back(in);
  }
  std::printf("%s: %zu inputs, %zu failed\n", tool, inputs.size(), failed.size());
  return failed.empty() ? 0 : 1;
}

}  // namespace blockd::fuzz
