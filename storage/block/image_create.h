// Creating an image file for blockdev-snapshot-sync's overlay and drive-mirror's target (QEMU's bdrv_img_create); runs on the home thread of the source node.
#pragma once
#include <cstdint>
#include <string>

#include "protocol/error.h"
#include "storage/block/driver.h"

namespace blockd::block {

struct overlay_image {
  std::string filename;        // the new image file (created, or emptied when it exists)
  std::string format;          // its format driver ("qcow2")
  int64_t size = 0;            // virtual size: the snapshotted node's length
  std::string backing_file;    // what the header names as backing (the old node's filename)
  std::string backing_format;  // and its format (the old node's driver)
};

// Checks the format as QEMU's image creation does (unknown format, no creation, no backing file
// support) and creates the image through the drivers' own blockdev-create code on a private
// file node. The caller runs on the thread whose loop `env` belongs to: the file node's I/O
// turns that loop while this blocks.
result<void> create_overlay_image(const overlay_image& img, const driver_env& env);

// The format checks alone (no I/O), in QEMU's order, so a transaction can refuse early.
result<void> check_overlay_format(const std::string& format);

// drive-mirror's target: the same image, with or without a backing file (img.backing_file empty),
// in any format blockd creates (raw: a plain file of the size). Same thread rule as above.
result<void> create_image(const overlay_image& img, const driver_env& env);
result<void> check_image_format(const std::string& format, bool with_backing);

}  // namespace blockd::block
