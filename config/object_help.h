// Help texts for --object help and --object TYPE,help; any thread.
#pragma once
#include <string>

namespace blockd {

std::string object_types_help();                     // the object types blockd can create
std::string object_type_help(const std::string& t);  // the properties of one type
bool object_type_supported(const std::string& t);    // iothread, main-loop

}  // namespace blockd
