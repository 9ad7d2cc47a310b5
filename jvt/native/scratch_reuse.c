/* Keeps XLA:CPU's per-step scratch block, and its kernels' large buffers, mapped between steps.

   XLA:CPU runs a compiled program in one scratch block holding all its temporaries (645 MB for
   a ViT-S/16 fp32 full fine-tuning step at batch 8). It allocates that block with
   posix_memalign when an execution starts and frees it when the execution ends. glibc serves
   a block that large with a fresh mmap and returns it with munmap, so every step touches
   hundreds of MB of new pages: 174,000 page faults a step for that step, each one a trap
   into the kernel and a page zeroed. PyTorch's activations are small blocks that glibc
   recycles.

   Preloaded (LD_PRELOAD), this library keeps freed scratch blocks (up to `slots` of them) and
   hands each to the next large request it fits (at least the size asked, at most twice it).
   XLA starts the next step's execution a few milliseconds before it frees the previous
   step's block, so a large request that finds no kept block that fits, while `slots` blocks
   that would fit are in use, waits (at most 50 ms) for one to come back: the process never
   holds more scratch blocks than it did without the library. `slots` is the number of
   executions that run at once: 1, or the device count of a CPU split into devices
   (jvt_scratch_set_slots, or XLA_FLAGS=--xla_force_host_platform_device_count=N).

   Only posix_memalign requests of at least JVT_SCRATCH_MIN_MB MiB (default 64) are kept as
   scratch blocks.

   The second kind, malloc blocks: XLA:CPU's YNNPACK fusions allocate their own intermediates
   with malloc while they run (a bf16 ViT-B/16 step at batch 32 fuses each attention product
   with a reduction: 66 buffers of 57 or 74 MiB a step, 688,000 page faults).
   glibc maps every malloc over 32 MiB (its largest mmap threshold) afresh. malloc requests of
   at least JVT_SCRATCH_MALLOC_MIN_MB MiB (default 32) are kept too, apart from the scratch
   blocks: a freed one goes to the next malloc request it fits closely (at least the size
   asked, at most an eighth more: these sizes repeat exactly, and a looser fit would let one
   size take the other's block), never makes a request wait (kernels of one step may run at
   once), and at most `slots` of each size (within an eighth) are kept, at most MALLOC_KEPT of
   them in all: past that the one freed longest ago goes back, so blocks of sizes no longer
   asked for do not stay. (A request that finds none that fits maps a new block but leaves the
   kept ones: one step's kernels ask for two sizes in turn.) Unlike scratch blocks, kept malloc
   blocks are held where glibc would have returned them: up to MALLOC_KEPT of them extra.
   jvt_scratch_set_slots returns every kept block of both kinds.

   Everything else goes straight to glibc. jvt.scratch builds, loads and reads this library.
*/
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

extern void *__libc_malloc(size_t size);
extern void *__libc_memalign(size_t alignment, size_t size);
extern void *__libc_realloc(void *ptr, size_t size);
extern void __libc_free(void *ptr);

#define MAX_BLOCKS 64         /* large blocks tracked in use, and most kept at once */
#define MALLOC_KEPT 8         /* most malloc blocks kept at once */
#define WAIT_NS 50000000L     /* longest wait for a block to come back: 50 ms */
#define PAGE 4096

/* The two kinds of block, each fitted, kept and returned among its own kind only. */
enum { SCRATCH, MALLOC, ANY = -1 };

typedef struct {
  void *ptr;
  size_t size;
  int kind;
  unsigned long freed_at;  /* kept blocks: a count of keeps, which is older */
} block_t;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t returned = PTHREAD_COND_INITIALIZER;
static block_t in_use[MAX_BLOCKS];
static block_t kept[MAX_BLOCKS];
static int n_in_use;  /* read without the lock by free()'s fast path: atomic */
static int n_kept;
static int slots = 1;
static unsigned long keeps;
static size_t min_bytes = 64UL << 20;         /* scratch blocks: posix_memalign */
static size_t malloc_min_bytes = 32UL << 20;  /* malloc blocks */

/* Counters, read by jvt.scratch.stats(). */
static long reused, mapped, waited, timed_out, malloc_reused, malloc_mapped;

__attribute__((constructor)) static void configure(void) {
  const char *mb = getenv("JVT_SCRATCH_MIN_MB");
  if (mb && atol(mb) > 0) min_bytes = (size_t)atol(mb) << 20;
  const char *malloc_mb = getenv("JVT_SCRATCH_MALLOC_MIN_MB");
  if (malloc_mb && atol(malloc_mb) > 0) malloc_min_bytes = (size_t)atol(malloc_mb) << 20;
  const char *flags = getenv("XLA_FLAGS");
  const char *key = "xla_force_host_platform_device_count=";
  const char *at = flags ? strstr(flags, key) : NULL;
  if (at && atoi(at + strlen(key)) > 1) slots = atoi(at + strlen(key));
  if (slots > MAX_BLOCKS) slots = MAX_BLOCKS;
}

/* Frees every kept block of `kind`, or of every kind if `kind` is ANY (under the lock). */
static void return_kept(int kind) {
  for (int i = 0; i < n_kept;)
    if (kind == ANY || kept[i].kind == kind) {
      __libc_free(kept[i].ptr);
      kept[i] = kept[--n_kept];
    } else {
      i++;
    }
}

void jvt_scratch_set_slots(int n) {
  pthread_mutex_lock(&mu);
  slots = n < 1 ? 1 : n > MAX_BLOCKS ? MAX_BLOCKS : n;
  return_kept(ANY);  /* kept for the old count */
  pthread_mutex_unlock(&mu);
}

void jvt_scratch_stats(long out[9]) {
  pthread_mutex_lock(&mu);
  out[0] = reused; out[1] = mapped; out[2] = waited; out[3] = timed_out;
  out[4] = n_in_use; out[5] = n_kept; out[6] = slots;
  out[7] = malloc_reused; out[8] = malloc_mapped;
  pthread_mutex_unlock(&mu);
}

/* Frees every kept block (their memory goes back to the system). */
void jvt_scratch_release(void) {
  pthread_mutex_lock(&mu);
  return_kept(ANY);
  pthread_mutex_unlock(&mu);
}

/* Whether a block of `have` bytes serves a request of `want`: at least it, and at most twice it
   (scratch) or an eighth more (malloc). */
static int fits(size_t have, size_t want, int kind) {
  if (have < want) return 0;
  return kind == SCRATCH ? have / 2 <= want : have - want <= want / 8;
}

/* Whether two blocks are of one size, for the count kept of each: either fits the other. */
static int same_size(size_t a, size_t b, int kind) { return fits(a, b, kind) || fits(b, a, kind); }

/* The smallest kept block of `kind` that fits `size`, or -1. */
static int fitting_kept(size_t size, int kind) {
  int best = -1;
  for (int i = 0; i < n_kept; i++)
    if (kept[i].kind == kind && fits(kept[i].size, size, kind) &&
        (best < 0 || kept[i].size < kept[best].size))
      best = i;
  return best;
}

/* Whether a scratch block that fits `size` is about to come back: `slots` or more such blocks
   are in use (the previous step's scratch block, freed a few ms after the next step asks for
   its own). Other large buffers in use (a step's outputs, an input batch) do not make it wait. */
static int should_wait(size_t size) {
  if (fitting_kept(size, SCRATCH) >= 0) return 0;
  int fitting = 0;
  for (int i = 0; i < n_in_use; i++)
    fitting += in_use[i].kind == SCRATCH && fits(in_use[i].size, size, SCRATCH);
  return fitting >= slots;
}

static void wait_for_return(size_t size) {
  struct timespec deadline;
  clock_gettime(CLOCK_REALTIME, &deadline);
  deadline.tv_nsec += WAIT_NS;
  if (deadline.tv_nsec >= 1000000000L) { deadline.tv_sec++; deadline.tv_nsec -= 1000000000L; }
  waited++;
  while (should_wait(size))
    if (pthread_cond_timedwait(&returned, &mu, &deadline) == ETIMEDOUT) { timed_out++; return; }
}

/* A block of `size` bytes of `kind`: a kept one that fits, else a new one from glibc (a
   scratch block after every kept scratch block has gone back). Tracked as in use. Under the
   lock. */
static void *take(size_t size, int kind) {
  block_t b = {NULL, size, kind, 0};
  int i = fitting_kept(size, kind);
  if (i >= 0) {
    b = kept[i];
    kept[i] = kept[--n_kept];
    if (kind == SCRATCH) reused++; else malloc_reused++;
  } else {
    if (kind == SCRATCH) return_kept(SCRATCH);  /* the old program's block goes first */
    b.ptr = kind == SCRATCH ? __libc_memalign(PAGE, size) : __libc_malloc(size);
    if (!b.ptr) return NULL;
    if (kind == SCRATCH) mapped++; else malloc_mapped++;
  }
  if (n_in_use < MAX_BLOCKS) {
    in_use[n_in_use] = b;
    __atomic_store_n(&n_in_use, n_in_use + 1, __ATOMIC_RELAXED);
  }  /* else untracked: free() hands it straight back to glibc */
  return b.ptr;
}

int posix_memalign(void **out, size_t alignment, size_t size) {
  if (alignment % sizeof(void *) != 0 || (alignment & (alignment - 1)) != 0) return EINVAL;
  if (size < min_bytes || alignment > PAGE) {
    void *p = __libc_memalign(alignment, size);
    if (!p) return ENOMEM;
    *out = p;
    return 0;
  }
  pthread_mutex_lock(&mu);
  if (should_wait(size)) wait_for_return(size);
  void *p = take(size, SCRATCH);
  pthread_mutex_unlock(&mu);
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}

void *malloc(size_t size) {
  if (size < malloc_min_bytes) return __libc_malloc(size);
  pthread_mutex_lock(&mu);
  void *p = take(size, MALLOC);
  pthread_mutex_unlock(&mu);
  if (!p) errno = ENOMEM;
  return p;
}

/* Removes `ptr` from the blocks in use; that block, or one of size 0 if it is not one of them. */
static block_t untrack(void *ptr) {
  for (int i = 0; i < n_in_use; i++)
    if (in_use[i].ptr == ptr) {
      block_t b = in_use[i];
      in_use[i] = in_use[n_in_use - 1];
      __atomic_store_n(&n_in_use, n_in_use - 1, __ATOMIC_RELAXED);
      return b;
    }
  return (block_t){NULL, 0, SCRATCH, 0};
}

/* Index of a kept block to drop before `b` is kept, or -1 if none need go: at most `slots`
   scratch blocks, and `slots` malloc blocks of each size and MALLOC_KEPT in all, are kept; the
   one freed longest ago goes first. Under the lock. */
static int to_drop(block_t b) {
  int count = 0, oldest = -1, kind_count = 0, kind_oldest = -1;
  for (int i = 0; i < n_kept; i++) {
    if (kept[i].kind != b.kind) continue;
    kind_count++;
    if (kind_oldest < 0 || kept[i].freed_at < kept[kind_oldest].freed_at) kind_oldest = i;
    if (b.kind == SCRATCH || same_size(kept[i].size, b.size, b.kind)) {
      count++;
      if (oldest < 0 || kept[i].freed_at < kept[oldest].freed_at) oldest = i;
    }
  }
  if (count >= slots) return oldest;
  return b.kind == MALLOC && kind_count >= MALLOC_KEPT ? kind_oldest : -1;
}

void free(void *ptr) {
  if (ptr && __atomic_load_n(&n_in_use, __ATOMIC_RELAXED) > 0) {
    pthread_mutex_lock(&mu);
    block_t b = untrack(ptr);
    /* A block resized past this library's realloc (glibc's __libc_realloc called directly)
       may be a smaller chunk at the same address now: never keep that. */
    if (b.size && malloc_usable_size(ptr) >= b.size) {
      void *dropped = ptr;  /* kept is full and none of its kind need go: not kept */
      int i = to_drop(b);
      if (i >= 0) {
        dropped = kept[i].ptr;
        kept[i] = kept[--n_kept];
      }
      if (n_kept < MAX_BLOCKS) {
        if (dropped == ptr) dropped = NULL;
        b.freed_at = ++keeps;
        kept[n_kept++] = b;
        pthread_cond_broadcast(&returned);
      }
      pthread_mutex_unlock(&mu);
      if (dropped) __libc_free(dropped);
      return;
    }
    pthread_mutex_unlock(&mu);
  }
  __libc_free(ptr);
}

void *realloc(void *ptr, size_t size) {
  if (ptr && __atomic_load_n(&n_in_use, __ATOMIC_RELAXED) > 0) {
    pthread_mutex_lock(&mu);
    untrack(ptr);  /* a resized block is glibc's again */
    pthread_mutex_unlock(&mu);
  }
  return __libc_realloc(ptr, size);
}
