// Builds the introspection tree the way QEMU's generator lays it out; any thread.
#include "protocol/qmp/introspect.h"

#include <map>
#include <string>
#include <vector>

namespace blockd::qmp {
namespace {

class generator {
 public:
  explicit generator(const schema& s) : s_(s) {}

  boost::json::array run() {
    for (auto& e : s_.entities()) {
      if (e.is_command) {
        const auto& c = s_.commands()[e.index];
        boost::json::object o;
        o["name"] = c.name;
        o["meta-type"] = "command";
        o["arg-type"] = use(c.arg_type.empty() ? "q_empty" : c.arg_type);
        o["ret-type"] = use(c.ret_type.empty() ? "q_empty" : c.ret_type);
        if (c.allow_oob) o["allow-oob"] = true;
        features(o, c.features);
        out_.push_back(std::move(o));
      } else {
        const auto& ev = s_.events()[e.index];
        boost::json::object o;
        o["name"] = ev.name;
        o["meta-type"] = "event";
        o["arg-type"] = use(ev.arg_type.empty() ? "q_empty" : ev.arg_type);
        out_.push_back(std::move(o));
      }
    }
    // Emitting a type may use further types; the list grows while it is walked.
    for (size_t i = 0; i < used_.size(); ++i) emit(*used_[i]);
    return std::move(out_);
  }

 private:
  static void features(boost::json::object& o, const std::vector<std::string>& f) {
    if (f.empty()) return;
    boost::json::array a;
    for (auto& x : f) a.push_back(boost::json::string(x));
    o["features"] = std::move(a);
  }

  const type_def* canonical(const type_def* t) {
    // Every integer kind is shown as plain "int", and arrays of them as "[int]".
    if (t->kind == meta::builtin && t->json_type == "int") return s_.find_type("int");
    return t;
  }

  std::string use(const std::string& name) {
    const type_def* t = s_.find_type(name);
    if (t->kind == meta::array && canonical(s_.find_type(t->element))->name == "int") t = s_.find_type("[int]");
    t = canonical(t);
    bool seen = false;
    for (auto* u : used_)
      if (u == t) seen = true;
    if (!seen) used_.push_back(t);
    if (t->kind == meta::builtin) return t->name;
    if (t->kind == meta::array) return "[" + use(t->element) + "]";
    auto it = masked_.find(t->name);
    if (it != masked_.end()) return it->second;
    std::string n = std::to_string(masked_.size());
    masked_[t->name] = n;
    return n;
  }

  void emit(const type_def& t) {
    boost::json::object o;
    switch (t.kind) {
      case meta::builtin:
        o["name"] = t.name;
        o["meta-type"] = "builtin";
        o["json-type"] = t.json_type;
        break;
      case meta::enumeration: {
        o["name"] = use(t.name);
        o["meta-type"] = "enum";
        boost::json::array members, values;
        for (auto& v : t.values) {
          members.push_back(boost::json::object{{"name", v}});
          values.push_back(boost::json::string(v));
        }
        o["members"] = std::move(members);
        o["values"] = std::move(values);
        break;
      }
      case meta::array: {
        std::string el = use(t.element);
        o["name"] = "[" + el + "]";
        o["meta-type"] = "array";
        o["element-type"] = el;
        break;
      }
      case meta::object: {
        o["name"] = use(t.name);
        o["meta-type"] = "object";
        boost::json::array members;
        for (auto& m : t.members) {
          boost::json::object mo;
          mo["name"] = m.name;
          mo["type"] = use(m.type);
          if (m.optional) mo["default"] = nullptr;
          features(mo, m.features);
          members.push_back(std::move(mo));
        }
        o["members"] = std::move(members);
        if (!t.tag.empty()) {
          o["tag"] = t.tag;
          boost::json::array variants;
          std::vector<std::string> covered;
          for (auto& v : t.variants) {
            variants.push_back(boost::json::object{{"case", v.value}, {"type", use(v.type)}});
            covered.push_back(v.value);
          }
          // Discriminator values without a branch get the empty object, after the explicit ones.
          const type_def* tag_type = nullptr;
          for (auto& m : t.members)
            if (m.name == t.tag) tag_type = s_.find_type(m.type);
          if (tag_type)
            for (auto& v : tag_type->values) {
              bool has = false;
              for (auto& c : covered)
                if (c == v) has = true;
              if (!has) variants.push_back(boost::json::object{{"case", v}, {"type", use("q_empty")}});
            }
          o["variants"] = std::move(variants);
        }
        break;
      }
      case meta::alternate: {
        o["name"] = use(t.name);
        o["meta-type"] = "alternate";
        boost::json::array members;
        for (auto& a : t.alternatives) members.push_back(boost::json::object{{"type", use(a)}});
        o["members"] = std::move(members);
        break;
      }
    }
    features(o, t.features);
    out_.push_back(std::move(o));
  }

  const schema& s_;
  boost::json::array out_;
  std::vector<const type_def*> used_;
  std::map<std::string, std::string> masked_;
};

}  // namespace

boost::json::array introspect(const schema& s) { return generator(s).run(); }

boost::json::array command_list(const schema& s) {
  boost::json::array a;
  const auto& cmds = s.commands();
  for (auto it = cmds.rbegin(); it != cmds.rend(); ++it) a.push_back(boost::json::object{{"name", it->name}});
  return a;
}

}  // namespace blockd::qmp
