// What blockd reports as its version over QMP and on the command line; any thread.
#pragma once

namespace blockd::qmp {

// blockd speaks the QMP dialect of qemu-storage-daemon 10.2, so that is the QEMU version it reports:
// management tools gate features on it. The package string says which implementation answers.
inline constexpr int compat_major = 10;
inline constexpr int compat_minor = 2;
inline constexpr int compat_micro = 0;
inline constexpr const char* package_string = "blockd-" BLOCKD_VERSION;

}  // namespace blockd::qmp
