// The conformance suite's harness: a node stack on a local loop, temporary images, and every stack the suite runs (each a driver chain built through nodes); test thread.
#pragma once
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/loop.h>
#include <sys/ioctl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "config/objects/throttle_group.h"
#include "storage/block/contract.h"
#include "storage/block/driver.h"
#include "storage/block/local_loop.h"
#include "storage/block/node.h"
#include "storage/io/reactor.h"
#include "tests/drivers/fault_reactor.h"

namespace blockd::block {
namespace {


constexpr int64_t image_size = 4 << 20;

// A loop like an iothread's: deferred functions and reactor completions, on this thread only. The
// poll backend (BLOCKD_REACTOR=poll, or no io_uring on the host) runs file I/O on worker threads.
// The reactor is wrapped in a fault injector (passing everything through until a test sets a rule).
struct test_loop : local_loop {
  explicit test_loop(bool poll = false, unsigned ring = 256)
      : local_loop(std::make_unique<io::fault_reactor>(poll ? io::reactor::create_poll()
                                                            : io::reactor::create(ring, nullptr))) {}
  io::fault_reactor& faults() { return static_cast<io::fault_reactor&>(*reactor); }
  template <class Pred>
  void until(Pred done) {
    for (int i = 0; i < 1000000 && !done(); ++i) turn();
    ASSERT_TRUE(done());
  }
};

struct waiter final : io_waiter {
  int calls = 0;
  void io_done(io_request&) override { ++calls; }
};

// One stack of nodes under test; the top node is what requests go to.
struct stack {
  // Every node of the suite runs under the contract checker; a violation fails the test.
  // `checks` off: requests reach the drivers as they are sent (the checker hands each driver a copy,
  // which would hide how one request object passes down a chain of layers).
  explicit stack(bool poll = false, unsigned ring = 256, bool checks = true) : loop(poll, ring) {
    set_contract_checks(checks);
    set_contract_handler([](const std::string& what) { ADD_FAILURE() << what; });
  }
  test_loop loop;
  std::string path;
  int loop_dev = -1;  // an attached loop device (host_device stacks)
  bool direct = false;  // cache.direct=on for the nodes opened from now on
  std::string skip;     // why this stack cannot be built on this host
  // The objects opens may name: a throttle group "tg0" without limits (throttle stacks); the luks
  // stack puts its secret in a set of its own.
  std::shared_ptr<const object_refs> objects = [] {
    auto o = std::make_shared<object_refs>();
    o->by_id["tg0"].throttle = std::make_shared<qom::throttle_state>();
    return std::shared_ptr<const object_refs>(o);
  }();
  std::vector<std::unique_ptr<node>> nodes;
  node* top() { return nodes.back().get(); }

  std::vector<std::string> extra_paths;  // more images to remove (a quorum's, a log)
  // Events the drivers emit (QUORUM_*), in order.
  std::vector<std::pair<std::string, boost::json::object>> events;

  node* open(const std::string& driver, boost::json::object opts, node* child = nullptr) {
    std::vector<std::pair<std::string, node*>> kids;
    if (child) kids.emplace_back("file", child);
    node* n = open_with(driver, std::move(opts), kids);
    EXPECT_NE(n, nullptr) << open_error;
    return n;
  }
  // A node over children in named roles ("file" and "log", "children.0", ...).
  node* open_with(const std::string& driver, boost::json::object opts,
                  const std::vector<std::pair<std::string, node*>>& kids) {
    auto* e = find_driver(driver);
    EXPECT_NE(e, nullptr) << driver;
    driver_env env = loop.env();
    env.emit = [this](std::string name, boost::json::object data) { events.emplace_back(std::move(name), std::move(data)); };
    open_args a{opts, {}, env};
    a.direct = direct;
    if (objects) a.objects = objects;
    a.node_name = "n" + std::to_string(nodes.size());
    for (auto& [role, n] : kids) a.set_child(role, n);
    auto drv = e->open(a);
    if (!drv) {
      open_error = drv.error().desc;
      return nullptr;
    }
    node_settings s;
    s.name = "n" + std::to_string(nodes.size());
    s.driver = driver;
    s.direct = direct;
    s.discard_unmap = true;
    s.options = opts;
    nodes.push_back(std::make_unique<node>(std::move(s), std::move(*drv), env));
    nodes.back()->slots = std::move(a.edges);  // the driver's child handles point into these
    return nodes.back().get();
  }
  ~stack() {
    // Parents first: a format writes its caches back through its child when it closes.
    while (!nodes.empty()) nodes.pop_back();
    if (loop_dev >= 0) {
      ioctl(loop_dev, LOOP_CLR_FD, 0);
      close(loop_dev);
    }
    if (!path.empty()) unlink(path.c_str());
    for (auto& p : extra_paths) unlink(p.c_str());
  }
  std::string open_error;  // why the last open_with failed
};

std::string temp_image(int64_t size, const std::string& dir = "/dev/shm") {
  std::string tmpl = dir + "/blockd-conf-XXXXXX";
  int fd = mkstemp(tmpl.data());
  EXPECT_GE(fd, 0);
  EXPECT_EQ(ftruncate(fd, size), 0);
  close(fd);
  return tmpl;
}

// An image made once per process by `make` (a shell command with the path appended) and copied for
// every stack after that: QEMU's PBKDF2 benchmark (luks, encrypted qcow2) is slow and fails now and
// then (below), so the fewer runs the better, and each is retried. Empty when it could not be made; the template goes at exit.
std::string image_template(const std::string& make) {
  static std::map<std::string, std::string> made;
  if (auto it = made.find(make); it != made.end()) return it->second;
  std::string path = temp_image(0);
  std::string log = path + ".log";
  std::string cmd = make + " " + path + " >" + log + " 2>&1";
  // The benchmark's first round is timed with getrusage, which this kernel updates per scheduler tick:
  // it reads 0 ms now and then and qemu-img fails fast ("Unable to get accurate CPU usage", a known
  // QEMU bug); tries are cheap.
  int rc = 1;
  for (int i = 0; i < 60 && rc != 0; ++i) rc = std::system(cmd.c_str());
  if (rc != 0) {
    // The tool's own words go into the test's failure (the last attempt's output).
    std::ifstream in(log);
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    ADD_FAILURE() << "`" << make << "` failed 60 times (status " << rc << "): " << text;
    unlink(path.c_str());
    path.clear();
  }
  unlink(log.c_str());
  if (!path.empty()) {
    static std::vector<std::string> to_remove;
    if (to_remove.empty()) std::atexit([] { for (auto& p : to_remove) unlink(p.c_str()); });
    to_remove.push_back(path);
  }
  return made[make] = path;
}

// Copies an image_template to a fresh temp file; false when there is no template.
bool copy_of_template(stack& s, const std::string& make) {
  std::string tpl = image_template(make);
  s.path = temp_image(0);
  if (tpl.empty()) return false;
  std::error_code ec;
  std::filesystem::copy_file(tpl, s.path, std::filesystem::copy_options::overwrite_existing, ec);
  EXPECT_FALSE(ec) << ec.message();
  return !ec;
}

// A fresh qcow2 image made by qemu-img at s.path; false (and the stack skipped) without qemu-img.
bool make_qcow2(stack& s) {
  s.path = temp_image(0);
  std::string cmd = "qemu-img create -q -f qcow2 " + s.path + " " + std::to_string(image_size) + " >/dev/null 2>&1";
  if (std::system(cmd.c_str()) == 0) return true;
  s.skip = "qemu-img is not installed";
  return false;
}

// A directory whose file system takes O_DIRECT opens ($TMPDIR, /var/tmp, /tmp; tmpfs only since
// Linux 6.6), or "" with `why` saying what was tried.
std::string direct_io_dir(std::string* why) {
  std::vector<std::string> dirs;
  if (const char* t = getenv("TMPDIR"); t && *t) dirs.push_back(t);
  dirs.push_back("/var/tmp");
  dirs.push_back("/tmp");
  std::string tried;
  for (auto& d : dirs) {
    std::string p = d + "/blockd-dio-probe-XXXXXX";
    int fd = mkstemp(p.data());
    if (fd < 0) continue;
    close(fd);
    int dfd = open(p.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
    int err = errno;
    unlink(p.c_str());
    if (dfd >= 0) {
      close(dfd);
      return d;
    }
    tried += " " + d + " (" + std::strerror(err) + ")";
  }
  if (why) *why = "no directory takes O_DIRECT; tried" + tried + "; set TMPDIR to one on a disk file system";
  return "";
}

struct null_stack {
  static constexpr bool stores_data = false;
  static void build(stack& s) { s.open("null-co", {{"size", image_size}, {"read-zeroes", true}}); }
};
struct null_aio_latency_stack {
  static constexpr bool stores_data = false;
  static void build(stack& s) {
    s.open("null-aio", {{"size", image_size}, {"read-zeroes", true}, {"latency-ns", 20000}});
  }
};
struct file_stack {
  static constexpr bool stores_data = true;
  static void build(stack& s) {
    s.path = temp_image(image_size);
    s.open("file", {{"filename", s.path}});
  }
};
// aio=io_uring: reads and writes of this tmpfs file go through the ring (file_stack makes them on
// the iothread), so both paths of the file driver take the suite.
struct raw_over_file_stack {
  static constexpr bool stores_data = true;
  static void build(stack& s) {
    s.path = temp_image(image_size);
    node* f = s.open("file", {{"filename", s.path}, {"aio", "io_uring"}});
    s.open("raw", {}, f);
  }
};
struct raw_window_stack {
  static constexpr bool stores_data = true;
  static void build(stack& s) {
    s.path = temp_image(image_size + 8192);
    node* f = s.open("file", {{"filename", s.path}});
    s.open("raw", {{"offset", 4096}, {"size", image_size}}, f);
  }
};
// Seven raw windows stacked (15 layers on one request): the deepest filters find the layer stack full
// and copy the request; every window's shift must apply exactly once.
struct deep_raw_stack {
  static constexpr bool stores_data = true;
  static void build(stack& s) {
    s.path = temp_image(image_size + 7 * 4096);
    node* n = s.open("file", {{"filename", s.path}});
    for (int i = 1; i <= 7; ++i) n = s.open("raw", {{"offset", 4096}, {"size", image_size + (7 - i) * 4096}}, n);
  }
};
// qcow2 over a file, on an image qemu-img made (64 KiB clusters: the suite's 4 KiB requests land
// in partial clusters, so allocation, copy-on-write and the metadata writeback all take part).
struct qcow2_stack {
  static constexpr bool stores_data = true;
  static constexpr bool owns_every_byte = false;
  static void build(stack& s) {
    if (!make_qcow2(s)) return;
    node* f = s.open("file", {{"filename", s.path}});
    s.open("qcow2", {}, f);
  }
};
// blkdebug without rules over a file, and over qcow2 (where qcow2's events reach it and change nothing).
struct blkdebug_file_stack {
  static constexpr bool stores_data = true;
  static void build(stack& s) {
    s.path = temp_image(image_size);
    node* f = s.open("file", {{"filename", s.path}});
    s.open_with("blkdebug", {}, {{"image", f}});
  }
};
struct blkdebug_qcow2_stack {
  static constexpr bool stores_data = true;
  static constexpr bool owns_every_byte = false;
  static void build(stack& s) {
    if (!make_qcow2(s)) return;
    node* f = s.open("file", {{"filename", s.path}});
    node* d = s.open_with("blkdebug", {}, {{"image", f}});
    s.open("qcow2", {}, d);
  }
};
// blkverify over two files (both removed with the stack).
struct blkverify_stack {
  static constexpr bool stores_data = true;
  static void build(stack& s) {
    s.path = temp_image(image_size);
    s.extra_paths.push_back(temp_image(image_size));
    node* t = s.open("file", {{"filename", s.path}});
    node* r = s.open("file", {{"filename", s.extra_paths.back()}});
    s.open_with("blkverify", {}, {{"test", t}, {"raw", r}});
  }
};
// A throttle node whose group has no limit (every request passes the scheduler and goes at once),
// over a file and over qcow2.
struct throttle_over_file_stack {
  static constexpr bool stores_data = true;
  static void build(stack& s) {
    s.path = temp_image(image_size);
    node* f = s.open("file", {{"filename", s.path}});
    s.open("throttle", {{"throttle-group", "tg0"}}, f);
  }
};
// copy-before-write over a file, its target another file: every write copies old data first, and the
// guest view is the file's.
struct cbw_over_file_stack {
  static constexpr bool stores_data = true;
  static void build(stack& s) {
    s.path = temp_image(image_size);
    s.extra_paths.push_back(temp_image(image_size));
    node* f = s.open("file", {{"filename", s.path}});
    node* t = s.open("file", {{"filename", s.extra_paths.back()}});
    s.open_with("copy-before-write", {}, {{"file", f}, {"target", t}});
  }
};
struct throttle_over_qcow2_stack : qcow2_stack {
  static void build(stack& s) {
    qcow2_stack::build(s);
    if (s.skip.empty()) s.open("throttle", {{"throttle-group", "tg0"}}, s.top());
  }
};
// copy-on-read over a qcow2 overlay whose backing file holds (zero) data everywhere: every first
// read of a cluster copies it up (the overlay's allocating path under its cluster locks), and the
// suite's writes then race nothing but themselves.
struct cor_over_qcow2_stack {
  static constexpr bool stores_data = true;
  static constexpr bool owns_every_byte = false;
  static constexpr bool sparse = false;  // the backing file's zeroes are written data
  static void build(stack& s) {
    std::string base = temp_image(image_size);
    s.path = temp_image(0);
    std::string cmd = "qemu-io -f raw -c 'write -P 0 0 " + std::to_string(image_size) + "' " + base +
                      " >/dev/null 2>&1 && qemu-img create -q -f qcow2 -b " + base + " -F raw " + s.path + " " +
                      std::to_string(image_size) + " >/dev/null 2>&1";
    if (std::system(cmd.c_str()) != 0) {
      s.skip = "qemu-img or qemu-io is not installed";
      unlink(base.c_str());
      return;
    }
    node* b = s.open("file", {{"filename", base}});
    unlink(base.c_str());  // open: the file lives as long as the node
    node* f = s.open("file", {{"filename", s.path}});
    node* q = s.open_with("qcow2", {}, {{"file", f}, {"backing", b}});
    s.open("copy-on-read", {}, q);
  }
};
// preallocate under qcow2: every cluster the suite allocates grows the image file through the
// filter's reservation.
struct qcow2_over_preallocate_stack {
  static constexpr bool stores_data = true;
  static constexpr bool owns_every_byte = false;
  static void build(stack& s) {
    if (!make_qcow2(s)) return;
    node* f = s.open("file", {{"filename", s.path}});
    node* p = s.open("preallocate", {{"prealloc-size", 1 << 20}, {"prealloc-align", 65536}}, f);
    s.open("qcow2", {}, p);
  }
};
struct preallocate_stack {
  static constexpr bool stores_data = true;
  static void build(stack& s) {
    s.path = temp_image(image_size);
    node* f = s.open("file", {{"filename", s.path}});
    s.open("preallocate", {}, f);
  }
};
// luks over a file, on an image qemu-img made (aes-256-xts, iter-time 10 so opening is quick) and
// filled with encrypted zeroes (a fresh luks payload decrypts to noise): every request is decrypted
// or encrypted on the way, unaligned ones through read-modify-write.
struct luks_stack {
  static constexpr bool stores_data = true;
  static constexpr bool sparse = false;  // everything reads as data, as QEMU's luks reports it
  static void build(stack& s) {
    // The image is made, then zeroed through luks (its payload reads zeroes); $0 is the path.
    std::string sec = "--object secret,id=s0,data=pw ";
    std::string make = "sh -c 'qemu-img create -q -f luks " + sec + "-o key-secret=s0,iter-time=10 \"$0\" " +
                       std::to_string(image_size) + " && qemu-io " + sec +
                       "--image-opts driver=luks,key-secret=s0,file.filename=\"$0\" -c \"write -z 0 " +
                       std::to_string(image_size) + "\"'";
    if (!copy_of_template(s, make)) {
      s.skip = std::system("command -v qemu-img >/dev/null && command -v qemu-io >/dev/null") == 0
                   ? "qemu-img could not make a luks image (see its PBKDF2 benchmark)"
                   : "qemu-img/qemu-io are not installed";
      if (s.skip[0] == 'q' && s.skip[1] == 'e') ADD_FAILURE() << s.skip;
      return;
    }
    auto refs = std::make_shared<object_refs>();
    refs->by_id["s0"] = object_refs::entry{true, "pw", nullptr};
    s.objects = refs;
    node* f = s.open("file", {{"filename", s.path}});
    s.open("luks", {{"key-secret", "s0"}}, f);
  }
};
// qcow2 with encrypt.format=luks over a file, on an image qemu-img made (iter-time 10): data
// clusters are encrypted by their host offset, partial clusters are copied on write through
// decrypt/encrypt, requests are 512-byte aligned (the driver states it).
struct qcow2_luks_stack {
  static constexpr bool stores_data = true;
  static constexpr bool owns_every_byte = false;
  static void build(stack& s) {
    std::string make = "sh -c 'qemu-img create -q -f qcow2 --object secret,id=s0,data=pw -o "
                       "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 \"$0\" " +
                       std::to_string(image_size) + "'";
    if (!copy_of_template(s, make)) {
      s.skip = std::system("command -v qemu-img >/dev/null") == 0
                   ? "qemu-img could not make an encrypted qcow2 image (see its PBKDF2 benchmark)"
                   : "qemu-img is not installed";
      if (s.skip[0] == 'q' && s.skip[1] == 'e') ADD_FAILURE() << s.skip;
      return;
    }
    auto refs = std::make_shared<object_refs>();
    refs->by_id["s0"] = object_refs::entry{true, "pw", nullptr};
    s.objects = refs;
    node* f = s.open("file", {{"filename", s.path}});
    s.open("qcow2", {{"encrypt", boost::json::object{{"format", "luks"}, {"key-secret", "s0"}}}}, f);
  }
};
// The same file stacks with file I/O on the poll backend's workers.
// Three raw files voted on (2 of 3); every write reaches all three.
struct quorum_stack {
  static constexpr bool stores_data = true;
  static constexpr bool sparse = false;     // quorum has no block status: all data, allocated
  static constexpr bool redundant = true;   // one failing child is outvoted, not an error
  static void build(stack& s) {
    std::vector<std::pair<std::string, node*>> kids;
    for (int i = 0; i < 3; ++i) {
      std::string p = temp_image(image_size);
      s.extra_paths.push_back(p);
      kids.emplace_back("children." + std::to_string(i), s.open("file", {{"filename", p}}));
    }
    EXPECT_NE(s.open_with("quorum", {{"vote-threshold", 2}}, kids), nullptr) << s.open_error;
  }
};
// blklogwrites over a file, logging to another file.
struct blklogwrites_stack {
  static constexpr bool stores_data = true;
  static void build(stack& s) {
    s.path = temp_image(image_size);
    std::string log = temp_image(0);
    s.extra_paths.push_back(log);
    node* f = s.open("file", {{"filename", s.path}});
    node* l = s.open("file", {{"filename", log}});
    EXPECT_NE(s.open_with("blklogwrites", {}, {{"file", f}, {"log", l}}), nullptr) << s.open_error;
  }
};
template <class Base>
struct on_poll : Base {
  static constexpr bool poll = true;
};
// cache.direct=on: misaligned requests go through the driver's padding (read-modify-write).
struct file_direct_stack {
  static constexpr bool stores_data = true;
  static void build(stack& s) {
    std::string dir = direct_io_dir(&s.skip);
    if (dir.empty()) return;
    s.path = temp_image(image_size, dir);
    s.direct = true;
    s.open("file", {{"filename", s.path}});
  }
};
struct raw_window_direct_stack {
  static constexpr bool stores_data = true;
  static void build(stack& s) {
    std::string dir = direct_io_dir(&s.skip);
    if (dir.empty()) return;
    s.path = temp_image(image_size + 8192, dir);
    s.direct = true;
    node* f = s.open("file", {{"filename", s.path}});
    // Every request of the suite lands misaligned on the file: all of them are padded, and
    // neighbouring 4 KiB writes share a block, so the write ordering gets a workout too.
    s.open("raw", {{"offset", 100}, {"size", image_size}}, f);
  }
  // Hole punching frees only whole file-system blocks; a window off their alignment keeps partial
  // blocks allocated (zeroed), so block status reports data there.
  static constexpr bool holes_follow_requests = false;
};

// host_device on a loop device over a tmpfs file: discard and zeroing go through BLKDISCARD and
// BLKZEROOUT on the reactor's workers. Needs loop devices (root, not every container has them).
std::string attach_loop_device(const std::string& file, int& dev_fd, std::string& dev_path) {
  int ctl = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
  if (ctl < 0) return std::string("no /dev/loop-control: ") + std::strerror(errno);
  int n = ioctl(ctl, LOOP_CTL_GET_FREE);
  int err = errno;
  close(ctl);
  if (n < 0) return std::string("LOOP_CTL_GET_FREE: ") + std::strerror(err);
  dev_path = "/dev/loop" + std::to_string(n);
  dev_fd = open(dev_path.c_str(), O_RDWR | O_CLOEXEC);
  if (dev_fd < 0) return dev_path + ": " + std::strerror(errno);
  int back = open(file.c_str(), O_RDWR | O_CLOEXEC);
  int rc = ioctl(dev_fd, LOOP_SET_FD, back);
  err = errno;
  close(back);
  if (rc != 0) {
    close(dev_fd);
    dev_fd = -1;
    return "LOOP_SET_FD on " + dev_path + ": " + std::strerror(err);
  }
  return "";
}
struct host_device_stack {
  static constexpr bool stores_data = true;
  static constexpr bool sparse = false;  // a block device reports everything as data
  static void build(stack& s) {
    s.path = temp_image(image_size);
    std::string dev;
    s.skip = attach_loop_device(s.path, s.loop_dev, dev);
    if (!s.skip.empty()) return;
    s.open("host_device", {{"filename", dev}});
  }
};

template <class T>
constexpr bool holes_follow_requests() {
  if constexpr (requires { T::holes_follow_requests; })
    return T::holes_follow_requests;
  else
    return true;
}
template <class T>
constexpr bool sparse() {
  if constexpr (requires { T::sparse; })
    return T::sparse;
  else
    return true;
}
// A format reports what it has not allocated as not allocated (its backing file, or zeroes, shows
// through); a protocol node owns every byte of its range.
template <class T>
constexpr bool owns_every_byte() {
  if constexpr (requires { T::owns_every_byte; })
    return T::owns_every_byte;
  else
    return true;
}
// A stack run without the contract checker (see stack::stack).
template <class T>
constexpr bool redundant() {
  if constexpr (requires { T::redundant; })
    return T::redundant;
  else
    return false;
}
template <class Base>
struct unchecked : Base {
  static constexpr bool no_contract = true;
};
template <class T>
constexpr bool checked() {
  if constexpr (requires { T::no_contract; })
    return !T::no_contract;
  else
    return true;
}

template <class T>
constexpr bool uses_poll() {
  if constexpr (requires { T::poll; })
    return T::poll;
  else
    return false;
}

}  // namespace
}  // namespace blockd::block
