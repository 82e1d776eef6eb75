// Values spelled exactly as Python's repr() spells them, for error messages that must read the
// same on the C++ backend and on the Python reference (which formats with f-strings).
#pragma once

#include <ATen/ATen.h>

#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace trajops {

// str(torch.dtype) for every dtype (torch.int64, torch.complex64, torch.float8_e4m3fn...).
inline std::string py_dtype(at::ScalarType st) {
  // c10's names of the dtypes whose Python name is not simply the lower-cased c10 name.
  static const char* const kIrregular[][2] = {
      {"Byte", "uint8"},          {"Char", "int8"},           {"Short", "int16"},
      {"Int", "int32"},           {"Long", "int64"},          {"Half", "float16"},
      {"Float", "float32"},       {"Double", "float64"},      {"ComplexHalf", "complex32"},
      {"ComplexFloat", "complex64"}, {"ComplexDouble", "complex128"},
  };
  const std::string c10_name = c10::toString(st);
  for (const auto& pair : kIrregular) {
    if (c10_name == pair[0]) return std::string("torch.") + pair[1];
  }
  std::string lower = c10_name;  // Bool, BFloat16, UInt16, Float8_e5m2, QInt8 ... -> lower case
  for (char& ch : lower) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return "torch." + lower;
}

// repr(float(v)): the shortest digits that round-trip, fixed notation for decimal exponents in
// [-4, 16), scientific ("1e-05", "1.5e+300") outside, always a ".0" on integral values.
inline std::string py_float(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  if (v == 0) return std::signbit(v) ? "-0.0" : "0.0";
  char buf[40];
#if defined(__cpp_lib_to_chars) && __cpp_lib_to_chars >= 201611L
  // The shortest digits that read back as v (as Python's repr; printf's correctly rounded digits
  // at the shortest precision can fail to round-trip where a neighbour string does: -2^-24).
  const auto res = std::to_chars(buf, buf + sizeof buf - 1, v, std::chars_format::scientific);
  *res.ptr = '\0';
#else
  for (int prec = 1; prec <= 17; ++prec) {  // older standard libraries: rare ties may differ
    std::snprintf(buf, sizeof buf, "%.*e", prec - 1, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
#endif
  const std::string sci = buf;  // [-]d[.ddd]e(+|-)XX
  const size_t e_pos = sci.find('e');
  const int exp10 = std::atoi(sci.c_str() + e_pos + 1);
  const bool neg = sci[0] == '-';
  std::string digits;
  for (size_t i = neg ? 1 : 0; i < e_pos; ++i) {
    if (sci[i] != '.') digits += sci[i];
  }
  std::string out = neg ? "-" : "";
  if (exp10 < -4 || exp10 >= 16) {
    out += digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char exp_buf[8];
    std::snprintf(exp_buf, sizeof exp_buf, "e%c%02d", exp10 < 0 ? '-' : '+', std::abs(exp10));
    return out + exp_buf;
  }
  if (exp10 < 0) return out + "0." + std::string(-exp10 - 1, '0') + digits;
  const size_t int_len = static_cast<size_t>(exp10) + 1;
  if (digits.size() <= int_len) return out + digits + std::string(int_len - digits.size(), '0') + ".0";
  return out + digits.substr(0, int_len) + "." + digits.substr(int_len);
}

}  // namespace trajops
