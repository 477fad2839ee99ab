// A cache of large memory blocks for the process, loaded with LD_PRELOAD before the program starts.
//
// XLA:CPU allocates each execution's temporary buffer (up to GBs for a train step) with posix_memalign and
// frees it when the execution ends. glibc serves a block that large with a fresh mmap and returns it with
// munmap, so every train step faults the whole buffer in again, one 4 KiB page at a time (docs/cpu-memory.md).
// This library keeps such blocks mapped after they are freed and hands them out again:
//
// - A request of at least OFTJAX_BLOCK_CACHE_MIN bytes (default 32 MiB, glibc's largest mmap threshold) through
//   malloc, posix_memalign, aligned_alloc, memalign, valloc or pvalloc gets the smallest free cached block
//   that holds it and is at most twice its size (a small request never pins a large block), or else a block
//   of its own mmap (size rounded up to 2 MiB). Smaller requests go to glibc untouched.
// - free() of such a block keeps it mapped, free, for the next request.
// - Before a new block is mapped, the free blocks freed longest ago are unmapped until all mapped blocks,
//   the new one included, fit in the most bytes that were ever in use at once (or in what is in use now
//   plus the new block, when that is more). The blocks never hold more than the process once needed at the
//   same time, and a run whose step buffers vary in size (batches of several widths) keeps what fits.
// - A block free for longer than OFTJAX_BLOCK_CACHE_SECONDS (default 1; 0: no limit) is unmapped by a
//   thread of this library: steps reuse their buffers within milliseconds, while a pause (compiling a new
//   shape, writing a checkpoint) gives the memory back before it could add to the pause's own peak.
// - OFTJAX_BLOCK_CACHE_MAX (bytes, default unlimited) caps the free bytes kept; past it the free blocks
//   freed longest ago are unmapped first. OFTJAX_BLOCK_CACHE_TRACE=1 writes a line per event to stderr.
//
// Values are not affected: a reused block holds stale bytes, as glibc's heap memory does (callers that need
// zeros call calloc, which this library leaves to glibc). realloc, reallocarray, the sized frees and
// malloc_usable_size know the blocks. Every other pointer goes to glibc's own functions (__libc_malloc and
// friends, resolved without dlsym). One limit: a glibc function that reallocates or frees a caller's buffer
// from inside glibc (getline growing its line buffer, for one) does not see this library, so a buffer of
// 32 MiB or more must not be handed to such a function (Python, numpy and XLA do not).
//
// Built by setup.py as oftjax/cli/_block_cache*.so; oftjax/cli/_malloc.py starts a process with it.

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);

// glibc's own malloc_usable_size (this library defines one), looked up on first use.
static size_t glibc_usable_size(void *p) {
  static size_t (*fn)(void *) = NULL;
  if (!fn) fn = (size_t (*)(void *))dlsym(RTLD_NEXT, "malloc_usable_size");
  return fn ? fn(p) : 0;
}

#define MAX_BLOCKS 64
#define ROUND (2u << 20)

typedef struct {
  char *base;     // start of the mapping (NULL: slot empty)
  size_t cap;     // mapped bytes
  int in_use;
  uint64_t freed_at;  // when it was freed (CLOCK_MONOTONIC, ns): the oldest free block goes first
} Block;

static Block blocks[MAX_BLOCKS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static _Atomic uintptr_t lo = UINTPTR_MAX, hi = 0;  // every mapping ever made lies in [lo, hi)
static size_t min_size = 32u << 20;
static size_t max_free = SIZE_MAX;
static uint64_t keep_ns = 1000000000ull;  // how long a free block is kept (OFTJAX_BLOCK_CACHE_SECONDS)
static int reaper_started = 0;
static int trace = 0;  // OFTJAX_BLOCK_CACHE_TRACE=1: one line on stderr per block taken, mapped or freed
static size_t in_use_bytes = 0, peak_in_use = 0;  // bytes of blocks in use now, and the most ever (lock held)
static atomic_ulong stat_hits, stat_maps, stat_unmaps, stat_free_bytes;

static uint64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

// A fork copies the lock as it is: hold it across the fork so neither process inherits it taken. The child
// has no reaper thread (threads do not survive a fork); its first mapping starts one.
static void fork_prepare(void) { pthread_mutex_lock(&lock); }
static void fork_parent(void) { pthread_mutex_unlock(&lock); }
static void fork_child(void) {
  reaper_started = 0;
  pthread_mutex_unlock(&lock);
}

static void unmap_slot(Block *b);

// Unmaps the blocks that have been free for longer than keep_ns, four times a second. A train step frees its
// buffer and the next step asks for it again within milliseconds; a pause (compiling a new shape, writing a
// checkpoint) gives the memory back, so kept blocks do not add to the peak of what runs in between.
static void *reaper(void *arg) {
  (void)arg;
  const struct timespec quarter = {0, 250000000};
  for (;;) {
    nanosleep(&quarter, NULL);
    pthread_mutex_lock(&lock);
    uint64_t now = now_ns();
    for (int i = 0; i < MAX_BLOCKS; ++i) {
      Block *b = &blocks[i];
      if (b->base && !b->in_use && now - b->freed_at > keep_ns) unmap_slot(b);
    }
    pthread_mutex_unlock(&lock);
  }
  return NULL;
}

// Starts the reaper (with the lock held), once per process, where blocks are not kept forever.
static void start_reaper_locked(void) {
  if (reaper_started || keep_ns == UINT64_MAX) return;
  pthread_t t;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  pthread_attr_setstacksize(&attr, 64 * 1024);
  if (pthread_create(&t, &attr, reaper, NULL) == 0) reaper_started = 1;
  pthread_attr_destroy(&attr);
}

__attribute__((constructor)) static void init(void) {
  const char *s = getenv("OFTJAX_BLOCK_CACHE_MIN");
  if (s && *s) min_size = strtoull(s, NULL, 10);
  if (min_size < 4096) min_size = 4096;
  s = getenv("OFTJAX_BLOCK_CACHE_MAX");
  if (s && *s) max_free = strtoull(s, NULL, 10);
  s = getenv("OFTJAX_BLOCK_CACHE_SECONDS");
  if (s && *s) {
    double v = strtod(s, NULL);
    keep_ns = v <= 0 ? UINT64_MAX : (uint64_t)(v * 1e9);
  }
  s = getenv("OFTJAX_BLOCK_CACHE_TRACE");
  trace = s && *s && *s != '0';
  pthread_atfork(fork_prepare, fork_parent, fork_child);
}

// One trace line, formatted on the stack and written with write(2) (stdio streams may allocate), lock held.
static void say(const char *what, size_t size, size_t cap) {
  if (!trace) return;
  char line[160];
  int n = snprintf(line, sizeof line, "block cache %d: %s %zu MiB (block %zu MiB; in use %zu MiB, free %lu MiB)\n",
                   (int)getpid(), what, size >> 20, cap >> 20, in_use_bytes >> 20, atomic_load(&stat_free_bytes) >> 20);
  if (n > 0) (void)!write(2, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
}

static void unmap_slot(Block *b) {
  say("unmap", b->cap, b->cap);
  munmap(b->base, b->cap);
  atomic_fetch_add(&stat_free_bytes, -(unsigned long)b->cap);
  atomic_fetch_add(&stat_unmaps, 1);
  b->base = NULL;
  b->cap = 0;
}

// The free block freed longest ago (lock held), or NULL.
static Block *oldest_free_locked(void) {
  Block *oldest = NULL;
  for (int i = 0; i < MAX_BLOCKS; ++i) {
    Block *c = &blocks[i];
    if (c->base && !c->in_use && (!oldest || c->freed_at < oldest->freed_at)) oldest = c;
  }
  return oldest;
}

// A block of at least `size` bytes whose start is `align`-aligned (align <= 2 MiB: mappings are page-aligned
// and blocks start at the mapping), or NULL when the table is full or mmap fails.
static void *take(size_t size, size_t align) {
  if (align > 4096) return NULL;  // XLA asks for 64; larger alignments go to glibc
  size_t need = (size + ROUND - 1) / ROUND * ROUND;
  if (need < size) return NULL;
  pthread_mutex_lock(&lock);
  Block *best = NULL, *empty = NULL;
  for (int i = 0; i < MAX_BLOCKS; ++i) {
    Block *b = &blocks[i];
    if (!b->base) {
      if (!empty) empty = b;
    } else if (!b->in_use && b->cap >= need && b->cap / 2 <= need && (!best || b->cap < best->cap)) {
      best = b;
    }
  }
  if (best) {
    best->in_use = 1;
    in_use_bytes += best->cap;
    atomic_fetch_add(&stat_free_bytes, -(unsigned long)best->cap);
    atomic_fetch_add(&stat_hits, 1);
    say("reuse", size, best->cap);
    pthread_mutex_unlock(&lock);
    return best->base;
  }
  // A new block. The blocks mapped (in use, free, and this one) stay within the most that were ever in use
  // at once, or what is in use now plus this one: free blocks freed longest ago are unmapped until they fit.
  size_t budget = in_use_bytes + need > peak_in_use ? in_use_bytes + need : peak_in_use;
  while (in_use_bytes + atomic_load(&stat_free_bytes) + need > budget) {
    Block *oldest = oldest_free_locked();
    if (!oldest) break;
    unmap_slot(oldest);
    if (!empty) empty = oldest;
  }
  void *p = NULL;
  if (empty) {
    p = mmap(NULL, need, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      p = NULL;
    } else {
      empty->base = p;
      empty->cap = need;
      empty->in_use = 1;
      in_use_bytes += need;
      if (in_use_bytes > peak_in_use) peak_in_use = in_use_bytes;
      atomic_fetch_add(&stat_maps, 1);
      say("map", size, need);
      start_reaper_locked();
      uintptr_t a = (uintptr_t)p, e = a + need;
      if (a < atomic_load(&lo)) atomic_store(&lo, a);
      if (e > atomic_load(&hi)) atomic_store(&hi, e);
    }
  }
  pthread_mutex_unlock(&lock);
  return p;
}

static inline int maybe_ours(const void *p) {
  uintptr_t a = (uintptr_t)p;
  return a >= atomic_load_explicit(&lo, memory_order_relaxed) && a < atomic_load_explicit(&hi, memory_order_relaxed);
}

// The in-use block starting at p, with the lock held; NULL (lock released) when p is not one.
static Block *find_locked(const void *p) {
  pthread_mutex_lock(&lock);
  for (int i = 0; i < MAX_BLOCKS; ++i) {
    if (blocks[i].base == p && blocks[i].in_use) return &blocks[i];
  }
  pthread_mutex_unlock(&lock);
  return NULL;
}

static void give_back(Block *b) {
  b->in_use = 0;
  in_use_bytes -= b->cap;
  say("free", b->cap, b->cap);
  b->freed_at = now_ns();
  atomic_fetch_add(&stat_free_bytes, b->cap);
  while (atomic_load(&stat_free_bytes) > max_free) {
    Block *oldest = oldest_free_locked();
    if (!oldest) break;
    unmap_slot(oldest);
  }
}

void free(void *p) {
  if (p && maybe_ours(p)) {
    Block *b = find_locked(p);
    if (b) {
      give_back(b);
      pthread_mutex_unlock(&lock);
      return;
    }
  }
  __libc_free(p);
}

void *malloc(size_t size) {
  if (size >= min_size) {
    void *p = take(size, 16);
    if (p) return p;
  }
  return __libc_malloc(size);
}

static void *aligned(size_t align, size_t size) {
  if (size >= min_size) {
    void *p = take(size, align);
    if (p) return p;
  }
  return __libc_memalign(align, size);
}

int posix_memalign(void **out, size_t align, size_t size) {
  if (align < sizeof(void *) || (align & (align - 1)) != 0) return EINVAL;
  void *p = aligned(align, size);
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}

void *aligned_alloc(size_t align, size_t size) { return aligned(align, size); }
void *memalign(size_t align, size_t size) { return aligned(align, size); }
void *valloc(size_t size) { return aligned(4096, size); }

void *realloc(void *p, size_t size) {
  if (p && maybe_ours(p)) {
    Block *b = find_locked(p);
    if (b) {
      size_t cap = b->cap;
      pthread_mutex_unlock(&lock);
      if (size <= cap && size >= min_size) return p;
      void *q = malloc(size);
      if (!q) return NULL;
      memcpy(q, p, size < cap ? size : cap);
      free(p);
      return q;
    }
  }
  if (size >= min_size) {  // grows a glibc block into a cached one
    void *q = take(size, 16);
    if (q) {
      if (p) {
        size_t old = glibc_usable_size(p);
        memcpy(q, p, old < size ? old : size);
        __libc_free(p);
      }
      return q;
    }
  }
  return __libc_realloc(p, size);
}

void *reallocarray(void *p, size_t n, size_t size) {
  if (size && n > SIZE_MAX / size) {
    errno = ENOMEM;
    return NULL;
  }
  return realloc(p, n * size);
}

// C23's sized frees: glibc's own would hand the block to its heap.
void free_sized(void *p, size_t size) {
  (void)size;
  free(p);
}
void free_aligned_sized(void *p, size_t align, size_t size) {
  (void)align;
  (void)size;
  free(p);
}

void *pvalloc(size_t size) {
  size_t page = 4096;
  return aligned(page, size ? (size + page - 1) / page * page : page);
}

size_t malloc_usable_size(void *p) {
  if (p && maybe_ours(p)) {
    Block *b = find_locked(p);
    if (b) {
      size_t cap = b->cap;
      pthread_mutex_unlock(&lock);
      return cap;
    }
  }
  return glibc_usable_size(p);
}

// Counters for tests and reports: hits (requests served by a kept block), mappings made, mappings returned,
// free bytes kept now; then the settings: the smallest request served, the cap on free bytes.
void oftjax_block_cache_stats(unsigned long out[6]) {
  out[0] = atomic_load(&stat_hits);
  out[1] = atomic_load(&stat_maps);
  out[2] = atomic_load(&stat_unmaps);
  out[3] = atomic_load(&stat_free_bytes);
  out[4] = min_size;
  out[5] = max_free;
}
