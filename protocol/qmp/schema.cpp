// Schema model and definition helpers; definitions run once at first use (thread-safe static init).
#include "protocol/qmp/schema.h"

#include <stdexcept>

namespace blockd::qmp {

schema::schema() {
  builtin("str", scalar::str, "string");
  builtin("any", scalar::any, "value");
  builtin("bool", scalar::boolean, "boolean");
  builtin("number", scalar::number, "number");
  builtin("null", scalar::null, "null");
  builtin("int", scalar::i64, "int");
  builtin("int8", scalar::i8, "int");
  builtin("int16", scalar::i16, "int");
  builtin("int32", scalar::i32, "int");
  builtin("int64", scalar::i64, "int");
  builtin("uint8", scalar::u8, "int");
  builtin("uint16", scalar::u16, "int");
  builtin("uint32", scalar::u32, "int");
  builtin("uint64", scalar::u64, "int");
  builtin("size", scalar::size, "int");
  object("q_empty", "");
  ensure_array("int");  // every integer-kind list is introspected as this one
}

void schema::builtin(std::string name, scalar sk, std::string json_type) {
  type_def t;
  t.name = std::move(name);
  t.kind = meta::builtin;
  t.sk = sk;
  t.json_type = std::move(json_type);
  add(std::move(t));
}

type_def& schema::add(type_def t) {
  auto name = t.name;
  auto [it, fresh] = types_.emplace(name, std::make_unique<type_def>(std::move(t)));
  if (!fresh) throw std::logic_error("schema: duplicate type " + name);
  return *it->second;
}

std::string schema::ensure_array(const std::string& element) {
  std::string name = "[" + element + "]";
  if (!types_.count(name)) {
    type_def t;
    t.name = name;
    t.kind = meta::array;
    t.element = element;
    add(std::move(t));
  }
  return name;
}

std::vector<member> schema::parse_members(std::string_view spec) {
  std::vector<member> out;
  size_t i = 0;
  while (i < spec.size()) {
    while (i < spec.size() && spec[i] == ' ') ++i;
    if (i >= spec.size()) break;
    size_t j = spec.find(' ', i);
    if (j == std::string_view::npos) j = spec.size();
    std::string_view item = spec.substr(i, j - i);
    i = j;
    member m;
    if (item.front() == '*') {
      m.optional = true;
      item.remove_prefix(1);
    }
    auto colon = item.find(':');
    if (colon == std::string_view::npos) throw std::logic_error("schema: bad member spec");
    m.name = std::string(item.substr(0, colon));
    std::string_view type = item.substr(colon + 1);
    while (true) {
      auto at = type.rfind('@');
      if (at == std::string_view::npos) break;
      m.features.insert(m.features.begin(), std::string(type.substr(at + 1)));
      type = type.substr(0, at);
    }
    if (type.front() == '[')
      m.type = ensure_array(std::string(type.substr(1, type.size() - 2)));
    else
      m.type = std::string(type);
    out.push_back(std::move(m));
  }
  return out;
}

void schema::enumeration(std::string name, std::string_view values) {
  type_def t;
  t.name = std::move(name);
  t.kind = meta::enumeration;
  size_t i = 0;
  while (i < values.size()) {
    while (i < values.size() && values[i] == ' ') ++i;
    size_t j = values.find(' ', i);
    if (j == std::string_view::npos) j = values.size();
    if (j > i) t.values.emplace_back(values.substr(i, j - i));
    i = j;
  }
  add(std::move(t));
}

void schema::object(std::string name, std::string_view members, std::string_view base) {
  type_def t;
  t.name = std::move(name);
  t.kind = meta::object;
  if (!base.empty()) {
    auto* b = find_type(base);
    if (!b) throw std::logic_error("schema: unknown base " + std::string(base));
    t.members = b->members;
  }
  for (auto& m : parse_members(members)) t.members.push_back(std::move(m));
  add(std::move(t));
}

void schema::flat_union(std::string name, std::string_view base_members, std::string tag,
                        std::vector<std::pair<std::string, std::string>> branches, bool open_branches) {
  type_def t;
  t.open_branches = open_branches;
  t.name = std::move(name);
  t.kind = meta::object;
  t.members = parse_members(base_members);
  t.tag = std::move(tag);
  for (auto& [value, type] : branches) t.variants.push_back({value, type});
  add(std::move(t));
}

void schema::alternate(std::string name, std::vector<std::string> alternatives) {
  type_def t;
  t.name = std::move(name);
  t.kind = meta::alternate;
  t.alternatives = std::move(alternatives);
  add(std::move(t));
}

void schema::command(std::string name, std::string_view args, std::string ret, bool boxed_type) {
  command_def c;
  c.name = name;
  if (boxed_type) {
    c.arg_type = std::string(args);
  } else if (!args.empty()) {
    c.arg_type = "q_obj_" + name + "-arg";
    object(c.arg_type, args);
  }
  if (!ret.empty() && ret.front() == '[') ret = ensure_array(ret.substr(1, ret.size() - 2));
  c.ret_type = std::move(ret);
  entities_.push_back({true, commands_.size()});
  commands_.push_back(std::move(c));
}

void schema::event(std::string name, std::string_view data) {
  event_def e;
  e.name = name;
  if (!data.empty()) {
    e.arg_type = "q_obj_" + name + "-arg";
    object(e.arg_type, data);
  }
  entities_.push_back({false, events_.size()});
  events_.push_back(std::move(e));
}

const type_def* schema::find_type(std::string_view name) const {
  auto it = types_.find(name);
  return it == types_.end() ? nullptr : it->second.get();
}

const command_def* schema::find_command(std::string_view name) const {
  for (auto& c : commands_)
    if (c.name == name) return &c;
  return nullptr;
}

void schema::command_features(const std::string& name, std::vector<std::string> features) {
  for (auto& c : commands_)
    if (c.name == name) c.features = std::move(features);
}

void schema::type_features(const std::string& name, std::vector<std::string> features) {
  auto it = types_.find(name);
  if (it != types_.end()) it->second->features = std::move(features);
}

}  // namespace blockd::qmp
