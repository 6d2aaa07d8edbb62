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
//
// Read-ahead: once a step has made a layer's pages resident, a thread of the pool's own reads
// the pages the next `ahead` layers asked for at the step before (a step's choice differs
// little from the last one's) that are no longer resident, while this layer computes: a pool
// smaller than a step's pages cycles through them every step, and then the reads overlap the
// compute instead of stalling it. Its reads never evict a page the current call has pinned (the
// slots a running kernel reads), another page read ahead and not asked for yet, or a page of
// the same job, and a page read before a write or reset of the pool is dropped.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
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
                 int64_t rec, int64_t slots, int64_t ahead)
    : L_(layers), H_(heads), P_(pages), rec_(rec), S_(slots), ahead_(ahead) {
  TORCH_CHECK(rec > 0 && slots > 0 && pages > 0 && ahead >= 0, "KV pages: bad sizes");
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  TORCH_CHECK(fd_ >= 0, "cannot create the KV page file ", path, ": ", std::strerror(errno));
  ::unlink(path.c_str());  // anonymous from now on: no file is left behind, even after a crash
  pool = torch::zeros({S_, rec_}, torch::dtype(torch::kUInt8));
  table = torch::full({L_, H_, P_}, -1, torch::dtype(torch::kInt32));
  owner_.assign(S_, -1);
  ref_.assign(S_, 0);
  early_.assign(S_, 0);
  pin_.assign(S_, 0);
  last_.resize(L_);
}

void KVPages::read_at(uint8_t* dst, int64_t n, int64_t off) const {
  transfer([&](uint8_t* p, int64_t k, int64_t o) { return ::pread(fd_, p, k, o); }, "reading",
           dst, n, off);
}

KVPages::~KVPages() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
  if (fd_ >= 0) ::close(fd_);
}

void KVPages::reset() {
  std::lock_guard<std::mutex> lk(mu_);
  table.fill_(-1);
  std::fill(owner_.begin(), owner_.end(), -1);
  std::fill(ref_.begin(), ref_.end(), 0);
  std::fill(early_.begin(), early_.end(), 0);
  for (auto& l : last_) l.clear();
  jobs_.clear();
  ++gen_;
  used_ = written_ = 0;
}

int64_t KVPages::resident_locked() const {
  int64_t n = 0;
  for (int64_t o : owner_) n += o >= 0;
  return n;
}

int64_t KVPages::resident() const {
  std::lock_guard<std::mutex> lk(mu_);
  return resident_locked();
}

int32_t KVPages::victim(bool must, const std::vector<int64_t>* spare) {
  if (used_ < S_) return static_cast<int32_t>(used_++);
  for (int64_t tries = 0; tries < 2 * S_ + 1; ++tries) {
    const int64_t s = hand_;
    hand_ = (hand_ + 1) % S_;
    if (pin_[s] == epoch_) continue;  // needed by this very call
    if (!must && early_[s]) continue;  // a read ahead does not evict another one
    if (spare && std::binary_search(spare->begin(), spare->end(), owner_[s])) continue;
    if (ref_[s]) {
      ref_[s] = 0;  // a second chance
      continue;
    }
    if (owner_[s] >= 0) table.data_ptr<int32_t>()[owner_[s]] = -1;
    owner_[s] = -1;
    return static_cast<int32_t>(s);
  }
  TORCH_CHECK(!must, "the KV page pool (", S_, " pages) is smaller than one step's pages");
  return -1;
}

void KVPages::place(int64_t flat, int32_t slot, bool pin) {
  table.data_ptr<int32_t>()[flat] = slot;
  owner_[slot] = flat;
  ref_[slot] = 1;
  early_[slot] = !pin;
  if (pin) pin_[slot] = epoch_;
}

void KVPages::write(int64_t layer, int64_t p0, torch::Tensor data) {
  TORCH_CHECK(data.dtype() == torch::kUInt8 && data.is_contiguous() && data.dim() == 3 &&
                  data.size(0) == H_ && data.size(2) == rec_, "pages must be [H, n, rec] bytes");
  const int64_t n = data.size(1);
  TORCH_CHECK(0 <= layer && layer < L_ && 0 <= p0 && p0 + n <= P_, "pages out of range");
  std::lock_guard<std::mutex> lk(mu_);
  ++epoch_;
  ++gen_;
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
  std::lock_guard<std::mutex> lk(mu_);
  ++epoch_;
  // a read ahead of this layer not started yet is too late: this call reads what it lacks
  jobs_.erase(std::remove_if(jobs_.begin(), jobs_.end(), [&](auto& j) { return j.first == layer; }),
              jobs_.end());
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
        ahead_used_ += early_[s];
        early_[s] = 0;
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
  std::vector<int64_t>& last = last_[layer];  // what the next step will likely ask for again
  last.clear();
  for (int64_t h = 0; h < H_; ++h)
    for (int64_t i = 0; i < k; ++i) last.push_back((layer * H_ + h) * P_ + pages[h * k + i]);
  std::sort(last.begin(), last.end());
  for (int64_t d = 1; d <= ahead_ && d < L_; ++d) read_later((layer + d) % L_);
}

void KVPages::ensure_tensor(int64_t layer, torch::Tensor pages) {
  TORCH_CHECK(pages.dtype() == torch::kInt32 && pages.is_contiguous() && pages.dim() == 2,
              "pages must be [H, K] int32");
  ensure(layer, pages.data_ptr<int32_t>(), pages.size(0), pages.size(1));
}

void KVPages::read_later(int64_t layer) {
  const std::vector<int64_t>& want = last_[layer];
  const int32_t* tb = table.data_ptr<int32_t>();
  if (std::all_of(want.begin(), want.end(), [&](int64_t f) { return tb[f] >= 0; })) return;
  auto same = std::find_if(jobs_.begin(), jobs_.end(), [&](auto& j) { return j.first == layer; });
  if (same != jobs_.end()) {
    same->second = want;
  } else {
    jobs_.emplace_back(layer, want);
  }
  if (!thread_.joinable()) thread_ = std::thread([this] { read_ahead(); });
  wake_.notify_one();
}

void KVPages::read_ahead() {
  std::vector<uint8_t> run;
  const int32_t* tb = table.data_ptr<int32_t>();
  uint8_t* pool_p = pool.data_ptr<uint8_t>();
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    busy_ = false;
    idle_.notify_all();
    wake_.wait(lk, [&] { return stop_ || !jobs_.empty(); });
    if (stop_) return;
    busy_ = true;
    std::vector<int64_t> job = std::move(jobs_.front().second);
    jobs_.pop_front();
    for (size_t i = 0; i < job.size() && !stop_;) {
      if (tb[job[i]] >= 0) {
        ++i;
        continue;
      }
      size_t j = i + 1;  // a run of consecutive pages not resident: one read
      while (j < job.size() && job[j] == job[j - 1] + 1 && tb[job[j]] < 0) ++j;
      const int64_t n = static_cast<int64_t>(j - i), off = job[i] * rec_;
      const uint64_t gen = gen_;
      run.resize(n * rec_);
      lk.unlock();
      bool ok = true;
      try {
        read_at(run.data(), n * rec_, off);
        ::posix_fadvise(fd_, off, n * rec_, POSIX_FADV_DONTNEED);
      } catch (...) {  // a failed read ahead costs nothing: the step reads the page itself
        ok = false;
      }
      lk.lock();
      for (int64_t r = 0; ok && gen == gen_ && r < n; ++r) {
        if (tb[job[i + r]] >= 0) continue;  // read by a step meanwhile
        const int32_t s = victim(false, &job);
        if (s < 0) break;
        std::memcpy(pool_p + s * rec_, run.data() + r * rec_, rec_);
        place(job[i + r], s, false);
        ++ahead_read_;
      }
      i = j;
    }
  }
}

void KVPages::wait() {
  std::unique_lock<std::mutex> lk(mu_);
  idle_.wait(lk, [&] { return stop_ || (jobs_.empty() && !busy_); });
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
  std::lock_guard<std::mutex> lk(mu_);
  bulk_ += H_ * n;
  return out;
}

std::vector<int64_t> KVPages::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  return {hits_, misses_, bulk_, resident_locked(), ahead_read_, ahead_used_};
}
