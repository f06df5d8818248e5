// Small text-formatting helpers shared by the CLI commands.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace lm2::cli {

// 1234567 -> "1,234,567".
std::string WithCommas(uint64_t n);
// 1536 -> "1.5 KiB"; exact bytes under 1 KiB.
std::string HumanBytes(uint64_t n);
// 1234567 -> "1.23 M"; 2400000000 -> "2.40 B"; plain under 1000.
std::string HumanCount(uint64_t n);
// {0, 1, 2} -> "[0, 1, 2]".
std::string ListString(const std::vector<int64_t>& v);

}  // namespace lm2::cli
