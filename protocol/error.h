// Control-path error vocabulary shared by every layer (QMP class + text); plain C++, any thread.
#pragma once
#include <expected>
#include <string>
#include <utility>

namespace blockd {

// The QMP error classes QSD can send. Everything that is not one of the specific classes is GenericError.
enum class error_class { generic_error, command_not_found, device_not_active, device_not_found };

inline const char* error_class_name(error_class c) {
  switch (c) {
    case error_class::command_not_found: return "CommandNotFound";
    case error_class::device_not_active: return "DeviceNotActive";
    case error_class::device_not_found: return "DeviceNotFound";
    case error_class::generic_error: break;
  }
  return "GenericError";
}

// One control-path failure: the class a QMP client sees, the text it sees, and an optional hint
// that stays local (QMP never sends hints; the command line prints them on a second line).
struct error {
  error_class cls = error_class::generic_error;
  std::string desc;
  std::string hint;

  error() = default;
  explicit error(std::string d) : desc(std::move(d)) {}
  error(error_class c, std::string d) : cls(c), desc(std::move(d)) {}
};

template <class T>
using result = std::expected<T, error>;

inline std::unexpected<error> fail(std::string desc) { return std::unexpected<error>(error(std::move(desc))); }
inline std::unexpected<error> fail(error_class c, std::string desc) {
  return std::unexpected<error>(error(c, std::move(desc)));
}

}  // namespace blockd
