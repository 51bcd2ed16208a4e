// QEMU's job tables (job.c JobSTT and JobVerbTable) and the QAPI names; plain C++, any thread.
#include "actors/job/job_state.h"

namespace blockd::job {
namespace {

const char* const status_names[status_count] = {"undefined", "created", "running",  "paused",    "ready", "standby",
                                                "waiting",   "pending", "aborting", "concluded", "null"};
const char* const verb_names[verb_count] = {"cancel",   "pause",   "resume",   "set-speed",
                                            "complete", "dismiss", "finalize", "change"};
const char* const type_names[type_count] = {"commit", "stream",        "mirror",        "backup",         "create",
                                            "amend",  "snapshot-load", "snapshot-save", "snapshot-delete"};

// JobSTT, copied from job.c (the same in 7.2 and 10.2). Rows: from; columns: to; in status order
// U C R P Y S W D X E N. aborting -> aborting is allowed (a late failure updates the rc again) and
// emits nothing, because only a change of state is an event.
constexpr bool stt[status_count][status_count] = {
    /* U: */ {0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0},
    /* C: */ {0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1},
    /* R: */ {0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0},
    /* P: */ {0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0},
    /* Y: */ {0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0},
    /* S: */ {0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0},
    /* W: */ {0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0},
    /* D: */ {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0},
    /* X: */ {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0},
    /* E: */ {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1},
    /* N: */ {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
};

// JobVerbTable, copied from job.c. Rows: verb; columns: state U C R P Y S W D X E N.
constexpr bool verb_table[verb_count][status_count] = {
    /* cancel:    */ {0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0},
    /* pause:     */ {0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0},
    /* resume:    */ {0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0},
    /* set-speed: */ {0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0},
    /* complete:  */ {0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0},
    /* dismiss:   */ {0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0},
    /* finalize:  */ {0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0},
    /* change:    */ {0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0},
};

template <class E, int N>
std::optional<E> parse(std::string_view s, const char* const (&names)[N]) {
  for (int i = 0; i < N; ++i)
    if (s == names[i]) return static_cast<E>(i);
  return std::nullopt;
}

}  // namespace

const char* name(status s) { return status_names[static_cast<int>(s)]; }
const char* name(verb v) { return verb_names[static_cast<int>(v)]; }
const char* name(type t) { return type_names[static_cast<int>(t)]; }
std::optional<status> parse_status(std::string_view s) { return parse<status>(s, status_names); }
std::optional<verb> parse_verb(std::string_view s) { return parse<verb>(s, verb_names); }
std::optional<type> parse_type(std::string_view s) { return parse<type>(s, type_names); }

bool transition_allowed(status from, status to) { return stt[static_cast<int>(from)][static_cast<int>(to)]; }

bool verb_allowed(verb v, status s) { return verb_table[static_cast<int>(v)][static_cast<int>(s)]; }

result<void> apply_verb(const std::string& id, status s, verb v) {
  if (verb_allowed(v, s)) return {};
  return fail("Job '" + id + "' in state '" + name(s) + "' cannot accept command verb '" + name(v) + "'");
}

bool is_completed(status s) {
  switch (s) {
    case status::undefined:
    case status::created:
    case status::running:
    case status::paused:
    case status::ready:
    case status::standby:
      return false;
    case status::waiting:
    case status::pending:
    case status::aborting:
    case status::concluded:
    case status::null:
      return true;
  }
  return false;
}

}  // namespace blockd::job
