// File plumbing shared by the model readers and writers: a read-only byte view that is either
// memory-mapped from disk or owned in memory, and an atomic "write to temp, fsync, rename" helper.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace osd::io {

// The bytes of a whole file. Mapped files stay mapped for the object's lifetime, so pointers
// into data() are valid exactly that long. Mapped data starts page-aligned.
class FileBytes {
 public:
  FileBytes() = default;
  // Maps `path` read-only; throws osd::Error (Io) naming the path if it cannot be opened or mapped.
  static FileBytes map(const std::string& path);
  static FileBytes own(std::vector<uint8_t> bytes);

  FileBytes(FileBytes&& other) noexcept;
  FileBytes& operator=(FileBytes&& other) noexcept;
  FileBytes(const FileBytes&) = delete;
  FileBytes& operator=(const FileBytes&) = delete;
  ~FileBytes();

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  // Mapped files: gives the whole pages within [p, p + n) back to the kernel (they read back from
  // the file if touched again), for bytes a reader has copied elsewhere. Owned bytes: nothing.
  void drop_pages(const uint8_t* p, size_t n) const;

 private:
  void release();

  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  bool mapped_ = false;
  std::vector<uint8_t> owned_;
};

// n bytes of zeroed anonymous memory, aligned to 2 MiB and in transparent huge pages where the
// system allows them (its "madvise" mode): for large buffers read in full for every token, which
// then take a TLB entry per 2 MiB instead of per 4 KiB. Throws std::bad_alloc when none is left.
class HugeBuffer {
 public:
  HugeBuffer() = default;
  explicit HugeBuffer(size_t n);
  HugeBuffer(HugeBuffer&& other) noexcept;
  HugeBuffer& operator=(HugeBuffer&& other) noexcept;
  HugeBuffer(const HugeBuffer&) = delete;
  HugeBuffer& operator=(const HugeBuffer&) = delete;
  ~HugeBuffer();

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  uint8_t* base_ = nullptr;  // the mapping (data_ rounded up to 2 MiB inside it)
  size_t mapped_ = 0;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// Where a writer puts its bytes.
class Output {
 public:
  virtual ~Output() = default;
  virtual void write(const void* data, size_t n) = 0;
};

class VectorOutput : public Output {
 public:
  void write(const void* data, size_t n) override;
  std::vector<uint8_t> bytes;
};

// Replaces `path` atomically: `fill` writes into `<path>.tmp-<pid>-<random>` in the same
// directory, which is then fsynced and renamed over `path`, and the directory is fsynced.
// On any failure (including an exception from `fill`) the temp file is removed, `path` is left
// as it was, and osd::Error (Io) naming the path is thrown.
void write_atomic(const std::string& path, const std::function<void(Output&)>& fill);

}  // namespace osd::io
