// keyval parser: items, key fragments, value escapes, nesting and array conversion; any thread.
#include "config/keyval.h"
#include "config/escaped_value.h"

#include <algorithm>
#include <cctype>
#include <map>
#include <string>
#include <vector>

namespace blockd {
namespace {

constexpr size_t max_fragment = 127;

bool is_index(std::string_view f) {
  return !f.empty() && std::all_of(f.begin(), f.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// A QAPI-style name: a letter then letters, digits, '-' or '_'; or a downstream "__vendor.name_x".
bool is_name(std::string_view f) {
  auto ident = [](std::string_view s) {
    if (s.empty() || !std::isalpha(static_cast<unsigned char>(s[0]))) return false;
    return std::all_of(s.begin() + 1, s.end(), [](char c) {
      return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_';
    });
  };
  if (f.starts_with("__")) {
    auto us = f.find('_', 2);
    if (us == std::string_view::npos || us == 2) return false;
    auto vendor = f.substr(2, us - 2);
    bool ok = std::all_of(vendor.begin(), vendor.end(), [](char c) {
      return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '-';
    });
    return ok && ident(f.substr(us + 1));
  }
  return ident(f);
}

// Intermediate tree: a node is either a leaf string or a map of children (kept sorted by key so
// that numeric children can be checked for density).
struct node {
  bool leaf = false;
  std::string value;
  std::map<std::string, node> kids;
  std::vector<std::string> order;  // first-seen order of children
};

result<void> insert(node& root, const std::vector<std::string>& frags, std::string value) {
  node* cur = &root;
  std::string prefix;
  for (size_t i = 0; i < frags.size(); ++i) {
    const auto& f = frags[i];
    bool last = i + 1 == frags.size();
    auto it = cur->kids.find(f);
    std::string here = prefix.empty() ? f : prefix + "." + f;
    if (it == cur->kids.end()) {
      cur->order.push_back(f);
      it = cur->kids.emplace(f, node{}).first;
      it->second.leaf = last;
    } else if (it->second.leaf != last) {
      return fail("Parameters '" + here + ".*' used inconsistently");
    }
    if (last) {
      it->second.value = std::move(value);  // a repeated key: the last value wins
      return {};
    }
    prefix = here;
    cur = &it->second;
  }
  return {};
}

result<boost::json::value> to_json(const node& n, const std::string& path) {
  if (n.leaf) return boost::json::value(boost::json::string(n.value));
  bool any_index = false, all_index = true;
  for (auto& k : n.order) {
    if (is_index(k)) any_index = true;
    else all_index = false;
  }
  if (any_index && !all_index) return fail("Parameters '" + path + ".*' used inconsistently");
  if (any_index) {
    std::vector<std::pair<unsigned long, const node*>> items;
    for (auto& [k, child] : n.kids) items.emplace_back(std::stoul(k), &child);
    std::sort(items.begin(), items.end());
    boost::json::array arr;
    for (size_t i = 0; i < items.size(); ++i) {
      if (items[i].first != i) return fail("Parameter '" + path + "." + std::to_string(i) + "' missing");
      auto v = to_json(*items[i].second, path + "." + std::to_string(i));
      if (!v) return v;
      arr.push_back(std::move(*v));
    }
    return boost::json::value(std::move(arr));
  }
  boost::json::object obj;
  for (auto& k : n.order) {
    auto v = to_json(n.kids.at(k), path.empty() ? k : path + "." + k);
    if (!v) return v;
    obj[k] = std::move(*v);
  }
  return boost::json::value(std::move(obj));
}

}  // namespace

result<keyval_parsed> keyval_parse(std::string_view text, std::string_view implied_key) {
  keyval_parsed out;
  node root;
  size_t i = 0;
  bool first = true;
  while (i < text.size()) {
    // The key runs to '=' or ','.
    size_t key_end = text.find_first_of("=,", i);
    if (key_end == std::string_view::npos) key_end = text.size();
    std::string_view key = text.substr(i, key_end - i);
    bool has_eq = key_end < text.size() && text[key_end] == '=';
    if (!has_eq) {
      if (key == "help" || key == "?") {
        out.help = true;
        i = key_end < text.size() ? key_end + 1 : key_end;
        first = false;
        continue;
      }
      if (first && !implied_key.empty() && !key.empty()) {
        if (auto r = insert(root, {std::string(implied_key)}, std::string(key)); !r) return std::unexpected(r.error());
        i = key_end < text.size() ? key_end + 1 : key_end;
        first = false;
        continue;
      }
      if (key.empty()) return fail("Invalid parameter ''");
    }
    // Validate the key's fragments.
    std::vector<std::string> frags;
    size_t p = 0;
    bool valid = !key.empty();
    while (valid) {
      size_t dot = key.find('.', p);
      std::string_view frag = key.substr(p, dot == std::string_view::npos ? std::string_view::npos : dot - p);
      if (frag.size() > max_fragment) return fail("Parameter '" + std::string(key) + "' is too long");
      if (!is_index(frag) && !is_name(frag)) valid = false;
      frags.emplace_back(frag);
      if (dot == std::string_view::npos) break;
      p = dot + 1;
    }
    if (!valid) return fail("Invalid parameter '" + std::string(key) + "'");
    if (!has_eq) return fail("Expected '=' after parameter '" + std::string(key) + "'");
    size_t j = key_end + 1;
    std::string value = scan_escaped_value(text, j);
    if (auto r = insert(root, frags, std::move(value)); !r) return std::unexpected(r.error());
    i = j < text.size() ? j + 1 : j;
    first = false;
  }
  auto tree = to_json(root, "");
  if (!tree) return std::unexpected(tree.error());
  out.tree = std::move(tree->as_object());
  return out;
}

}  // namespace blockd
