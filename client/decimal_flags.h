#pragma once

// Integer flags read as decimal, for da-client and da-server alike.
//
// CLI11 reads integers in base 0 ("010" is 8, "0x10" is 16) and saturates values past the
// type's range; a flag such as --timeout-ms 05000 would silently mean 2560 ms. DecimalIntegers
// gives every integer option of an app (and of its subcommands, added before the call) a
// transform that accepts a decimal integer within int64, writes it back without leading zeros
// (so that CLI11's own conversion reads it as decimal), and refuses anything else, naming the
// value. A value past the option's own type is then CLI11's range error.

#include <cstdint>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/strings/numbers.h"

namespace da::client {

inline CLI::Validator DecimalInteger() {
  return CLI::Validator(
      [](std::string& value) -> std::string {
        int64_t parsed = 0;
        if (!absl::SimpleAtoi(value, &parsed)) {
          return "'" + value +
                 "' is not a decimal integer from -9223372036854775808 to 9223372036854775807";
        }
        value = std::to_string(parsed);
        return std::string();
      },
      "", "decimal");
}

// An option is an integer one by its type name ("INT", "UINT", "INT:..."), as CLI11 names it.
inline bool IsIntegerOption(const CLI::Option& option) {
  const std::string type = option.get_type_name();
  return type.rfind("INT", 0) == 0 || type.rfind("UINT", 0) == 0;
}

// Gives every integer option of `app` and of its subcommands (recursively) the transform.
inline void DecimalIntegers(CLI::App& app) {
  for (CLI::Option* option : app.get_options()) {
    if (IsIntegerOption(*option)) option->transform(DecimalInteger());
  }
  for (CLI::App* command : app.get_subcommands({})) DecimalIntegers(*command);
}

}  // namespace da::client
