// The KV cache's quantized pages on disk under a RAM budget (kv.py, `pool_bytes`).
//
// A page here is one KV head's 16 tokens of one layer, self-contained: its K codes, V codes and
// V scales and minimums in one record of `rec` bytes (the K group scales, the sinks, the page
// summaries and the fp16 window stay in RAM, in kv.py's tensors). Every page is written to a
// file once, when it is quantized (at a fixed offset: layer, head, page), and the file is the
// truth; the pool is `slots` records in RAM with a table [L, H, P] from each page to its slot
// (-1: on disk only). A decode step makes the pages it selected resident (`ensure`: one pread
// per run of consecutive missing pages), evicting by the clock (second chance) any page that
// this call does not need; pool pages are clean copies, so eviction writes nothing. Neither
// writes nor reads stay in the OS page cache (posix_fadvise DONTNEED): an offloaded page costs
// a disk read, as it would on a machine whose memory is full, and the budget is what it says.
// The file is unlinked as soon as it is open: it lives exactly as long as the cache.
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "runner.h"

namespace {

// all n bytes at `off` through `io` (pread or pwrite), on through short transfers and signals
template <typename Byte, typename Io>
void transfer(Io io, const char* what, Byte* p, int64_t n, int64_t off) {
  while (n > 0) {
    const ssize_t got = io(p, n, off);
    TORCH_CHECK(got > 0 || (got < 0 && errno == EINTR), what, " KV pages on disk failed: ",
                got < 0 ? std::strerror(errno) : "short file");
    if (got < 0) continue;
    p += got, n -= got, off += got;
  }
}

}  // namespace

KVPages::KVPages(const std::string& path, int64_t layers, int64_t heads, int64_t pages,
                 int64_t rec, int64_t slots)
    : L_(layers), H_(heads), P_(pages), rec_(rec), S_(slots) {
  TORCH_CHECK(rec > 0 && slots > 0 && pages > 0, "KV pages: bad sizes");
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  TORCH_CHECK(fd_ >= 0, "cannot create the KV page file ", path, ": ", std::strerror(errno));
  ::unlink(path.c_str());  // anonymous from now on: no file is left behind, even after a crash
  pool = torch::zeros({S_, rec_}, torch::dtype(torch::kUInt8));
  table = torch::full({L_, H_, P_}, -1, torch::dtype(torch::kInt32));
  owner_.assign(S_, -1);
  ref_.assign(S_, 0);
  pin_.assign(S_, 0);
}

void KVPages::read_at(uint8_t* dst, int64_t n, int64_t off) const {
  transfer([&](uint8_t* p, int64_t k, int64_t o) { return ::pread(fd_, p, k, o); }, "reading",
           dst, n, off);
}

KVPages::~KVPages() {
  if (fd_ >= 0) ::close(fd_);
}

void KVPages::reset() {
  table.fill_(-1);
  std::fill(owner_.begin(), owner_.end(), -1);
  std::fill(ref_.begin(), ref_.end(), 0);
  used_ = written_ = 0;
}

int64_t KVPages::resident() const {
  int64_t n = 0;
  for (int64_t o : owner_) n += o >= 0;
  return n;
}

int32_t KVPages::victim() {
  if (used_ < S_) return static_cast<int32_t>(used_++);
  for (int64_t tries = 0; tries < 2 * S_ + 1; ++tries) {
    const int64_t s = hand_;
    hand_ = (hand_ + 1) % S_;
    if (pin_[s] == epoch_) continue;  // needed by this very call
    if (ref_[s]) {
      ref_[s] = 0;  // a second chance
      continue;
    }
    if (owner_[s] >= 0) table.data_ptr<int32_t>()[owner_[s]] = -1;
    owner_[s] = -1;
    return static_cast<int32_t>(s);
  }
  TORCH_CHECK(false, "the KV page pool (", S_, " pages) is smaller than one step's pages");
}

void KVPages::place(int64_t flat, int32_t slot) {
  table.data_ptr<int32_t>()[flat] = slot;
  owner_[slot] = flat;
  ref_[slot] = 1;
  pin_[slot] = epoch_;
}

void KVPages::write(int64_t layer, int64_t p0, torch::Tensor data) {
  TORCH_CHECK(data.dtype() == torch::kUInt8 && data.is_contiguous() && data.dim() == 3 &&
                  data.size(0) == H_ && data.size(2) == rec_, "pages must be [H, n, rec] bytes");
  const int64_t n = data.size(1);
  TORCH_CHECK(0 <= layer && layer < L_ && 0 <= p0 && p0 + n <= P_, "pages out of range");
  ++epoch_;
  const uint8_t* src = data.data_ptr<uint8_t>();
  uint8_t* pool_p = pool.data_ptr<uint8_t>();
  int32_t* tb = table.data_ptr<int32_t>();
  for (int64_t h = 0; h < H_; ++h) {
    const int64_t flat = (layer * H_ + h) * P_ + p0, off = flat * rec_;
    transfer([&](const uint8_t* p, int64_t k, int64_t o) { return ::pwrite(fd_, p, k, o); },
             "writing", src + h * n * rec_, n * rec_, off);
    ::sync_file_range(fd_, off, n * rec_,
                      SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
                          SYNC_FILE_RANGE_WAIT_AFTER);
    ::posix_fadvise(fd_, off, n * rec_, POSIX_FADV_DONTNEED);
    // the newest pages are the likeliest to be read: they go to the pool as well
    for (int64_t i = 0; i < n && n * H_ <= S_; ++i) {
      int32_t s = tb[flat + i];
      if (s < 0) s = victim();
      std::memcpy(pool_p + s * rec_, src + (h * n + i) * rec_, rec_);
      place(flat + i, s);
    }
  }
  written_ = std::max(written_, p0 + n);
}

void KVPages::ensure(int64_t layer, const int32_t* pages, int64_t heads, int64_t k) {
  TORCH_CHECK(heads == H_ && 0 <= layer && layer < L_, "ensure: pages must be [H, K]");
  TORCH_CHECK(heads * k <= S_, "the KV page pool (", S_, " pages) cannot hold one layer's ",
              heads * k, " selected pages");
  ++epoch_;
  int32_t* tb = table.data_ptr<int32_t>();
  uint8_t* pool_p = pool.data_ptr<uint8_t>();
  std::vector<uint8_t> run;
  for (int64_t h = 0; h < H_; ++h) {  // pin the resident ones first: they must not be evicted
    const int32_t* hp = pages + h * k;
    const int64_t base = (layer * H_ + h) * P_;
    for (int64_t i = 0; i < k; ++i) {
      TORCH_CHECK(hp[i] >= 0 && hp[i] < written_, "a KV page that was never written");
      const int32_t s = tb[base + hp[i]];
      if (s >= 0) {
        ref_[s] = 1;
        pin_[s] = epoch_;
        ++hits_;
      }
    }
  }
  for (int64_t h = 0; h < H_; ++h) {
    const int32_t* hp = pages + h * k;
    const int64_t base = (layer * H_ + h) * P_;
    for (int64_t i = 0; i < k;) {
      if (tb[base + hp[i]] >= 0) {
        ++i;
        continue;
      }
      int64_t j = i + 1;  // a run of consecutive missing pages: one read
      while (j < k && hp[j] == hp[j - 1] + 1 && tb[base + hp[j]] < 0) ++j;
      const int64_t n = j - i, off = (base + hp[i]) * rec_;
      run.resize(n * rec_);
      read_at(run.data(), n * rec_, off);
      ::posix_fadvise(fd_, off, n * rec_, POSIX_FADV_DONTNEED);
      for (int64_t r = 0; r < n; ++r) {
        const int32_t s = victim();
        std::memcpy(pool_p + s * rec_, run.data() + r * rec_, rec_);
        place(base + hp[i + r], s);
      }
      misses_ += n;
      i = j;
    }
  }
}

void KVPages::ensure_tensor(int64_t layer, torch::Tensor pages) {
  TORCH_CHECK(pages.dtype() == torch::kInt32 && pages.is_contiguous() && pages.dim() == 2,
              "pages must be [H, K] int32");
  ensure(layer, pages.data_ptr<int32_t>(), pages.size(0), pages.size(1));
}

torch::Tensor KVPages::read(int64_t layer, int64_t n) {
  TORCH_CHECK(0 <= layer && layer < L_ && 0 <= n && n <= written_, "read: pages out of range");
  auto out = torch::empty({H_, n, rec_}, torch::dtype(torch::kUInt8));
  uint8_t* dst = out.data_ptr<uint8_t>();
  for (int64_t h = 0; h < H_; ++h) {
    const int64_t off = (layer * H_ + h) * P_ * rec_;
    read_at(dst + h * n * rec_, n * rec_, off);
    ::posix_fadvise(fd_, off, n * rec_, POSIX_FADV_DONTNEED);
  }
  bulk_ += H_ * n;
  return out;
}

std::vector<int64_t> KVPages::stats() const { return {hits_, misses_, bulk_, resident()}; }
