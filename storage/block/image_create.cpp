// Creating an overlay image file for blockdev-snapshot-sync through the drivers' create functions; the home thread of the snapshotted node.
#include "storage/block/image_create.h"

#include <algorithm>

#include "storage/block/graph.h"

namespace blockd::block {

result<void> check_overlay_format(const std::string& format) {
  const driver_entry* e = find_driver(format);
  if (!e || e->protocol) return fail("Unknown file format '" + format + "'");
  // Formats that cannot name a backing file refuse it before anything is created.
  bool backing = std::find(e->child_roles.begin(), e->child_roles.end(), "backing") != e->child_roles.end();
  if (!backing) return fail("Backing file not supported for file format '" + format + "'");
  if (!e->create) return fail("Format driver '" + format + "' does not support image creation");
  return {};
}

result<void> create_overlay_image(const overlay_image& img, const driver_env& env) {
  if (auto r = check_overlay_format(img.format); !r) return r;
  const driver_entry* file = find_driver("file");
  if (!file || !file->create) return fail("internal error: the file driver cannot create images");
  // The file first (an existing one is emptied, as QEMU's create does), then the format on a
  // private node over it: a graph of its own, so nothing else ever sees the half-made image.
  boost::json::object fopts{{"driver", "file"}, {"filename", img.filename}, {"size", 0}};
  create_args fa{fopts, [](const boost::json::value&) -> result<node*> { return fail("no references"); }};
  if (auto r = file->create(fa); !r) return r;
  graph scratch([env] { return env; });
  auto fnode = scratch.add(boost::json::object{{"driver", "file"}, {"node-name", "overlay-file"}, {"filename", img.filename}});
  if (!fnode) return std::unexpected(fnode.error());
  boost::json::object o{{"driver", img.format}, {"file", "overlay-file"}, {"size", img.size}};
  if (!img.backing_file.empty()) {
    o["backing-file"] = img.backing_file;
    if (!img.backing_format.empty()) o["backing-fmt"] = img.backing_format;
  }
  const driver_entry* fmt = find_driver(img.format);
  node* target = *fnode;
  // What a creation asks of its file: write and resize (QEMU's temporary block backend).
  if (auto r = scratch.attach_user(*target, "create", perm_user{"overlay creation", perm_write | perm_resize, perm_all}); !r)
    return r;
  create_args ca{o, [target](const boost::json::value& ref) -> result<node*> {
                   if (ref.is_string() && ref.as_string() == "overlay-file") return target;
                   return fail("internal error: unexpected reference in an overlay's options");
                 }};
  return fmt->create(ca);
}

}  // namespace blockd::block
