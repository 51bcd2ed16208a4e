// QEMU's job vocabulary and tables (JobStatus, JobVerb, JobType, JobSTT, JobVerbTable); plain C++, any thread.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "protocol/error.h"

namespace blockd::job {

// JobStatus, in QAPI order (the tables below are indexed by it).
enum class status : uint8_t { undefined, created, running, paused, ready, standby, waiting, pending, aborting, concluded, null };
inline constexpr int status_count = 11;

// JobVerb, in QAPI order. "change" is 8.2+ (block-job-change).
enum class verb : uint8_t { cancel, pause, resume, set_speed, complete, dismiss, finalize, change };
inline constexpr int verb_count = 8;

// JobType, in QAPI order. QSD runs commit/stream/mirror/backup (block jobs) and create/amend.
enum class type : uint8_t { commit, stream, mirror, backup, create, amend, snapshot_load, snapshot_save, snapshot_delete };
inline constexpr int type_count = 9;

const char* name(status s);
const char* name(verb v);
const char* name(type t);
std::optional<status> parse_status(std::string_view s);
std::optional<verb> parse_verb(std::string_view s);
std::optional<type> parse_type(std::string_view s);

// JobSTT: whether a job may go from `from` to `to`. Anything else is a bug (QEMU asserts).
bool transition_allowed(status from, status to);
// JobVerbTable: whether a job in state `s` accepts `v`.
bool verb_allowed(verb v, status s);
// job_apply_verb: the verb table check with QEMU's refusal text.
result<void> apply_verb(const std::string& id, status s, verb v);
// job_is_completed: the work is over (waiting and later), whatever the outcome.
bool is_completed(status s);

}  // namespace blockd::job
