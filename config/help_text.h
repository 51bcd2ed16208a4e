// The --help and --version texts; any thread.
#pragma once
#include <string>

namespace blockd {

std::string help_text();
std::string version_text();

}  // namespace blockd
