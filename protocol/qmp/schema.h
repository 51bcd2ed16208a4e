// blockd's one QAPI schema model: types, commands, events; drives validation and introspection; any thread.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace blockd::qmp {

enum class meta { builtin, enumeration, object, array, alternate };

// The precise scalar kind behind a builtin (introspection shows every integer kind as "int").
enum class scalar { str, any, boolean, number, null, i8, i16, i32, i64, u8, u16, u32, u64, size };

struct member {
  std::string name;
  std::string type;
  bool optional = false;
  std::vector<std::string> features;
};

struct variant {
  std::string value;  // discriminator value
  std::string type;   // branch object type
};

struct type_def {
  std::string name;
  meta kind = meta::object;
  scalar sk = scalar::str;           // builtin
  std::string json_type;              // builtin: string|int|number|boolean|null|value
  std::vector<std::string> values;    // enumeration
  std::vector<member> members;        // object (base members first)
  std::string tag;                    // flat union discriminator ("" for plain structs)
  std::vector<variant> variants;      // explicit branches, in definition order
  bool open_branches = false;         // values without a branch accept any members (see visitor)
  std::string element;                // array
  std::vector<std::string> alternatives;  // alternate
  std::vector<std::string> features;
};

struct command_def {
  std::string name;
  std::string arg_type;  // "" = no arguments
  std::string ret_type;  // "" = returns {}
  bool allow_oob = false;
  std::vector<std::string> features;
};

struct event_def {
  std::string name;
  std::string arg_type;
};

// Definitions are added with a compact member syntax: space-separated "name:type" items, a leading
// '*' for optional members, "[T]" for arrays and "@feature" suffixes, e.g. "*enable:[QMPCapability]".
class schema {
 public:
  schema();

  void enumeration(std::string name, std::string_view values);  // space-separated values
  void object(std::string name, std::string_view members, std::string_view base = {});
  void flat_union(std::string name, std::string_view base_members, std::string tag,
                  std::vector<std::pair<std::string, std::string>> branches, bool open_branches = false);
  void alternate(std::string name, std::vector<std::string> alternatives);
  void type_features(const std::string& name, std::vector<std::string> features);  // features of a defined type
  void command_features(const std::string& name, std::vector<std::string> features);
  void command(std::string name, std::string_view args, std::string ret = {}, bool boxed_type = false);
  void event(std::string name, std::string_view data);

  const type_def* find_type(std::string_view name) const;  // arrays "[T]" resolve too
  const command_def* find_command(std::string_view name) const;

  // Commands and events in definition order (what introspection and query-commands walk).
  struct entity {
    bool is_command;
    size_t index;
  };
  const std::vector<entity>& entities() const { return entities_; }
  const std::vector<command_def>& commands() const { return commands_; }
  const std::vector<event_def>& events() const { return events_; }

 private:
  std::vector<member> parse_members(std::string_view spec);
  void builtin(std::string name, scalar sk, std::string json_type);
  std::string ensure_array(const std::string& element);
  type_def& add(type_def t);

  std::map<std::string, std::unique_ptr<type_def>, std::less<>> types_;
  std::vector<command_def> commands_;
  std::vector<event_def> events_;
  std::vector<entity> entities_;
};

// The project's schema: what blockd implements, with QSD 10.2's names and types.
const schema& qsd_schema();

}  // namespace blockd::qmp
