// Minimal test harness for the native tests: each test is a function registered with OSD_TEST,
// and CHECK macros record failures without aborting the run. One binary per area, run by ctest.
#pragma once
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

namespace osd_test {

struct Case {
  const char* name;
  std::function<void()> fn;
};

inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

inline int& failures() {
  static int n = 0;
  return n;
}

struct Registrar {
  Registrar(const char* name, std::function<void()> fn) { registry().push_back({name, std::move(fn)}); }
};

inline void fail(const char* file, int line, const std::string& what) {
  ++failures();
  std::fprintf(stderr, "  FAIL %s:%d: %s\n", file, line, what.c_str());
}

// Runs every registered test (or those whose name contains argv[1]) and prints a summary line.
inline int run_all(int argc, char** argv) {
  const char* filter = argc > 1 ? argv[1] : nullptr;
  int passed = 0, failed = 0;
  for (auto& c : registry()) {
    if (filter && !std::strstr(c.name, filter)) continue;
    int before = failures();
    try {
      c.fn();
    } catch (const std::exception& e) {
      fail(__FILE__, __LINE__, std::string("uncaught exception: ") + e.what());
    }
    bool ok = failures() == before;
    std::printf("%s %s\n", ok ? "ok  " : "FAIL", c.name);
    (ok ? passed : failed)++;
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}

}  // namespace osd_test

#define OSD_CAT2(a, b) a##b
#define OSD_CAT(a, b) OSD_CAT2(a, b)
#define OSD_TEST(name)                                                              \
  static void OSD_CAT(osd_test_fn_, name)();                                        \
  static osd_test::Registrar OSD_CAT(osd_test_reg_, name)(#name, OSD_CAT(osd_test_fn_, name)); \
  static void OSD_CAT(osd_test_fn_, name)()

#define CHECK(cond)                                                   \
  do {                                                                \
    if (!(cond)) osd_test::fail(__FILE__, __LINE__, "CHECK(" #cond ")"); \
  } while (0)

#define CHECK_EQ(a, b)                                                                        \
  do {                                                                                        \
    auto va_ = (a);                                                                           \
    auto vb_ = (b);                                                                           \
    if (!(va_ == vb_))                                                                        \
      osd_test::fail(__FILE__, __LINE__,                                                      \
                     std::string(#a " == " #b ": ") + std::to_string(va_) + " vs " + std::to_string(vb_)); \
  } while (0)

#define CHECK_NEAR(a, b, tol)                                                                     \
  do {                                                                                            \
    double va_ = (a), vb_ = (b), t_ = (tol);                                                      \
    if (!(std::fabs(va_ - vb_) <= t_))                                                            \
      osd_test::fail(__FILE__, __LINE__, std::string(#a " ~ " #b ": ") + std::to_string(va_) + \
                                             " vs " + std::to_string(vb_) + " tol " + std::to_string(t_)); \
  } while (0)

// Expects `expr` to throw an exception of type `E` whose message contains `substr`.
#define CHECK_THROWS(E, expr, substr)                                                     \
  do {                                                                                    \
    bool thrown_ = false;                                                                 \
    try {                                                                                 \
      expr;                                                                               \
    } catch (const E& e_) {                                                               \
      thrown_ = true;                                                                     \
      if (!std::strstr(e_.what(), substr))                                                \
        osd_test::fail(__FILE__, __LINE__, std::string("message lacks '") + substr + "': " + e_.what()); \
    }                                                                                     \
    if (!thrown_) osd_test::fail(__FILE__, __LINE__, "expected " #E " from " #expr);      \
  } while (0)

#define OSD_TEST_MAIN() \
  int main(int argc, char** argv) { return osd_test::run_all(argc, argv); }
