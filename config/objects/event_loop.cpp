// iothread and main-loop objects (see event_loop.h); plain C++, the model's thread.
#include "config/objects/event_loop.h"

#include "config/qom/model.h"
#include "config/qom/type_registry.h"

namespace blockd::qom {
namespace {

const char* const base_names[] = {"thread-pool-min", "aio-max-batch", "thread-pool-max"};
const char* const iothread_names[] = {"poll-max-ns", "poll-grow", "poll-shrink"};
const char* const thread_context_name = "thread-context";

int64_t* slot(event_loop_params& p, const std::string& name) {
  if (name == "poll-max-ns") return &p.poll_max_ns;
  if (name == "poll-grow") return &p.poll_grow;
  if (name == "poll-shrink") return &p.poll_shrink;
  if (name == "aio-max-batch") return &p.aio_max_batch;
  if (name == "thread-pool-min") return &p.thread_pool_min;
  if (name == "thread-pool-max") return &p.thread_pool_max;
  return nullptr;
}

// QEMU's event-loop setters take an int64 and refuse negatives with this text.
result<int64_t> read_param(const boost::json::value& v, const std::string& name) {
  auto n = json_int(v, name);
  if (!n) return n;
  if (*n < 0) return fail(name + " value must be in range [0, 9223372036854775807]");
  return n;
}

result<void> check_pool(const event_loop_params& p) {
  if (p.thread_pool_min > p.thread_pool_max || p.thread_pool_max == 0)
    return fail("bad thread-pool-min/thread-pool-max values");
  return {};
}

}  // namespace

result<event_loop_params> event_loop_object::parse(bool is_main_loop, const boost::json::object& props) {
  event_loop_params p;
  std::vector<const char*> names(std::begin(base_names), std::end(base_names));
  if (!is_main_loop) names.insert(names.end(), std::begin(iothread_names), std::end(iothread_names));
  for (const char* n : names)
    if (auto* v = props.if_contains(n)) {
      auto r = read_param(*v, n);
      if (!r) return std::unexpected(r.error());
      *slot(p, n) = *r;
    }
  // blockd's extension comes after QSD's own properties, so their checks keep QSD's order.
  if (!is_main_loop)
    if (auto r = opt_string(props, thread_context_name, p.thread_context); !r) return std::unexpected(r.error());
  return p;
}

factory event_loop_object::plain_factory(bool is_main_loop) {
  return [is_main_loop](const std::string&, const boost::json::object& props) -> result<std::unique_ptr<object>> {
    auto p = parse(is_main_loop, props);
    if (!p) return std::unexpected(p.error());
    return std::make_unique<event_loop_object>(is_main_loop, *p);
  };
}

result<boost::json::value> event_loop_object::get(const std::string& prop) const {
  if (!main_ && prop == thread_context_name) return boost::json::value(p_.thread_context);
  auto copy = p_;
  if (int64_t* s = slot(copy, prop)) return boost::json::value(*s);
  return object::get(prop);
}

result<void> event_loop_object::set(const std::string& prop, const boost::json::value& v) {
  if (!main_ && prop == thread_context_name) {
    auto id = json_string(v, prop);
    if (!id) return std::unexpected(id.error());
    if (!model_) {  // not completed yet: complete() resolves it
      p_.thread_context = *id;
      return {};
    }
    // Resolve the new one first; on any failure the old object, its reference and pinning stay.
    std::string old_id = p_.thread_context;
    const thread_context_object* old_ctx = ctx_;
    ref_handle old_ref = std::move(ctx_ref_);
    if (auto r = resolve_thread_context(*model_, *id); !r) {
      ctx_ = old_ctx;
      ctx_ref_ = std::move(old_ref);
      return r;
    }
    p_.thread_context = *id;
    if (auto r = thread_context_changed(); !r) {
      p_.thread_context = old_id;
      ctx_ = old_ctx;
      ctx_ref_ = std::move(old_ref);
      return r;
    }
    return {};
  }
  event_loop_params next = p_;
  int64_t* s = slot(next, prop);
  if (!s) return object::set(prop, v);
  auto r = read_param(v, prop);
  if (!r) return std::unexpected(r.error());
  *s = *r;
  if (prop.starts_with("thread-pool-"))
    if (auto c = check_pool(next); !c) return c;
  p_ = next;
  params_changed();
  return {};
}

result<void> event_loop_object::complete(model& m) {
  if (auto c = check_pool(p_); !c) return c;
  if (main_)
    for (object* o : m.objects())
      if (o != this && o->type_name() == "main-loop") return fail("only one main-loop instance allowed");
  if (!main_)
    if (auto r = resolve_thread_context(m, p_.thread_context); !r) return r;
  model_ = &m;
  return {};
}

result<void> event_loop_object::resolve_thread_context(model& m, const std::string& tc_id) {
  ctx_ = nullptr;
  ctx_ref_.reset();
  if (tc_id.empty()) return {};
  object* o = m.find(tc_id);
  if (!o)
    return fail("iothread '" + id() + "': Cannot find thread-context '" + tc_id +
                "'; create it first (object-add qom-type=thread-context,id=" + tc_id +
                ",cpu-affinity=[...]) or leave thread-context out");
  auto* tc = dynamic_cast<const thread_context_object*>(o);
  if (!tc)
    return fail("iothread '" + id() + "': object '" + tc_id + "' is a " + o->type_name() +
                ", not a thread-context; name a thread-context object");
  auto h = m.ref(tc_id, "iothread '" + id() + "'");
  if (!h) return std::unexpected(h.error());
  ctx_ = tc;
  ctx_ref_ = std::move(*h);
  return {};
}

result<void> event_loop_object::can_delete() const {
  // The main loop runs as long as the daemon does, as in QSD.
  if (main_) return fail("object '" + id() + "' is in use, can not be deleted");
  return {};
}

void register_event_loop_types(type_registry& r) {
  auto int_prop = [](const char* n) { return property_info{.name = n, .type = "int"}; };
  r.add({.name = "event-loop-base",
         .parent = "object",
         .abstract = true,
         .interfaces = {"user-creatable"},
         .properties = {int_prop("thread-pool-min"), int_prop("aio-max-batch"), int_prop("thread-pool-max")}});
  r.add({.name = "iothread",
         .parent = "event-loop-base",
         // thread-context is blockd's: QEMU's iothread cannot be pinned through a thread-context.
         .properties = {int_prop("poll-max-ns"), int_prop("poll-grow"), int_prop("poll-shrink"),
                        {.name = thread_context_name,
                         .type = "string",
                         .description = "blockd extension: id of a thread-context object whose CPUs the iothread "
                                        "and its worker threads run on"}},
         .make = event_loop_object::plain_factory(false)});
  r.add({.name = "main-loop", .parent = "event-loop-base", .make = event_loop_object::plain_factory(true)});
}

}  // namespace blockd::qom
