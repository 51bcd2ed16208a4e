// Creating an overlay image file for blockdev-snapshot-sync through the drivers' create functions; the home thread of the snapshotted node.
#include "storage/block/image_create.h"

#include <algorithm>

#include "storage/block/graph.h"

namespace blockd::block {

namespace {
// The formats QEMU's image creation (qemu-img create, bdrv_img_create) knows, and those of them
// whose creation takes a backing file: QEMU's checks are made against these, so a format blockd
// does not build yet fails as it would in QSD when QSD would fail too.
bool one_of(const std::string& f, std::initializer_list<const char*> l) {
  return std::any_of(l.begin(), l.end(), [&](const char* x) { return f == x; });
}
bool qemu_creates(const std::string& f) {
  return one_of(f, {"file", "host_device", "host_cdrom", "raw", "qcow2", "qcow", "qed", "vdi", "vhdx", "vmdk", "vpc",
                    "parallels", "luks", "nfs", "ssh", "gluster", "rbd", "iscsi"});
}
bool qemu_backs(const std::string& f) { return one_of(f, {"qcow2", "qcow", "qed", "vmdk"}); }
}  // namespace

result<void> check_overlay_format(const std::string& format) { return check_image_format(format, true); }

result<void> check_image_format(const std::string& format, bool with_backing) {
  const driver_entry* e = find_driver(format);
  if (!e && !qemu_creates(format)) return fail("Unknown file format '" + format + "'");
  if (!qemu_creates(format)) return fail("Format driver '" + format + "' does not support image creation");
  if (with_backing && !qemu_backs(format)) return fail("Backing file not supported for file format '" + format + "'");
  if (format == "raw" && e) return {};  // a plain file (create_image)
  if (!e || !e->create)
    return fail("Format '" + format + "' cannot create images in this blockd version (QSD can); use qcow2 or raw");
  return {};
}

result<void> create_overlay_image(const overlay_image& img, const driver_env& env) {
  if (auto r = check_overlay_format(img.format); !r) return r;
  return create_image(img, env);
}

result<void> create_image(const overlay_image& img, const driver_env& env) {
  if (auto r = check_image_format(img.format, !img.backing_file.empty()); !r) return r;
  const driver_entry* file = find_driver("file");
  if (!file || !file->create) return fail("internal error: the file driver cannot create images");
  if (img.format == "raw") {
    // Raw is the file itself: emptied, then sized (it reads zeroes, as QEMU's raw create leaves it).
    boost::json::object fopts{{"driver", "file"}, {"filename", img.filename}, {"size", img.size}};
    create_args fa{fopts, [](const boost::json::value&) -> result<node*> { return fail("no references"); }};
    return file->create(fa);
  }
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
