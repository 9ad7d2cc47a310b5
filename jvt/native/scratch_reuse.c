/* Keeps XLA:CPU's per-step scratch block mapped between steps.

   XLA:CPU runs a compiled program in one scratch block holding all its temporaries (645 MB for
   a ViT-S/16 fp32 full fine-tuning step at batch 8). It allocates that block with
   posix_memalign when an execution starts and frees it when the execution ends. glibc serves
   a block that large with a fresh mmap and returns it with munmap, so every step touches
   hundreds of MB of new pages: 174,000 page faults a step for that step, each one a trap
   into the kernel and a page zeroed. PyTorch's activations are small blocks that glibc
   recycles.

   Preloaded (LD_PRELOAD), this library keeps freed large blocks (up to `slots` of them) and
   hands each to the next large request it fits (at least the size asked, at most twice it).
   XLA starts the next step's execution a few milliseconds before it frees the previous
   step's block, so a large request that finds no kept block that fits, while `slots` blocks
   that would fit are in use, waits (at most 50 ms) for one to come back: the process never
   holds more large blocks than it did without the library. `slots` is the number of
   executions that run at once: 1, or the device count of a CPU split into devices
   (jvt_scratch_set_slots, or XLA_FLAGS=--xla_force_host_platform_device_count=N).

   Only posix_memalign requests of at least JVT_SCRATCH_MIN_MB MiB (default 64) are kept;
   everything else goes straight to glibc. jvt.scratch builds, loads and reads this library.
*/
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

extern void *__libc_memalign(size_t alignment, size_t size);
extern void *__libc_realloc(void *ptr, size_t size);
extern void __libc_free(void *ptr);

#define MAX_BLOCKS 64         /* large blocks tracked in use, and most kept at once */
#define WAIT_NS 50000000L     /* longest wait for a block to come back: 50 ms */
#define PAGE 4096

typedef struct {
  void *ptr;
  size_t size;
} block_t;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t returned = PTHREAD_COND_INITIALIZER;
static block_t in_use[MAX_BLOCKS];
static block_t kept[MAX_BLOCKS];
static int n_in_use;  /* read without the lock by free()'s fast path: atomic */
static int n_kept;
static int slots = 1;
static size_t min_bytes = 64UL << 20;

/* Counters, read by jvt.scratch.stats(). */
static long reused, mapped, waited, timed_out;

__attribute__((constructor)) static void configure(void) {
  const char *mb = getenv("JVT_SCRATCH_MIN_MB");
  if (mb && atol(mb) > 0) min_bytes = (size_t)atol(mb) << 20;
  const char *flags = getenv("XLA_FLAGS");
  const char *key = "xla_force_host_platform_device_count=";
  const char *at = flags ? strstr(flags, key) : NULL;
  if (at && atoi(at + strlen(key)) > 1) slots = atoi(at + strlen(key));
  if (slots > MAX_BLOCKS) slots = MAX_BLOCKS;
}

void jvt_scratch_set_slots(int n) {
  pthread_mutex_lock(&mu);
  slots = n < 1 ? 1 : n > MAX_BLOCKS ? MAX_BLOCKS : n;
  while (n_kept > slots) __libc_free(kept[--n_kept].ptr);
  pthread_mutex_unlock(&mu);
}

void jvt_scratch_stats(long out[7]) {
  pthread_mutex_lock(&mu);
  out[0] = reused; out[1] = mapped; out[2] = waited; out[3] = timed_out;
  out[4] = n_in_use; out[5] = n_kept; out[6] = slots;
  pthread_mutex_unlock(&mu);
}

/* Frees every kept block (their memory goes back to the system). */
void jvt_scratch_release(void) {
  pthread_mutex_lock(&mu);
  for (int i = 0; i < n_kept; i++) __libc_free(kept[i].ptr);
  n_kept = 0;
  pthread_mutex_unlock(&mu);
}

static int fits(size_t have, size_t want) { return have >= want && have / 2 <= want; }

/* The smallest kept block that fits `size` (at least it, at most twice it), or -1. */
static int fitting_kept(size_t size) {
  int best = -1;
  for (int i = 0; i < n_kept; i++)
    if (fits(kept[i].size, size) && (best < 0 || kept[i].size < kept[best].size)) best = i;
  return best;
}

/* Whether a block that fits `size` is about to come back: `slots` or more such blocks are in
   use (the previous step's scratch block, freed a few ms after the next step asks for its
   own). Other large buffers in use (a step's outputs, an input batch) do not make it wait. */
static int should_wait(size_t size) {
  if (fitting_kept(size) >= 0) return 0;
  int fitting = 0;
  for (int i = 0; i < n_in_use; i++) fitting += fits(in_use[i].size, size);
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
  block_t b = {NULL, size};
  int i = fitting_kept(size);
  if (i >= 0) {
    b = kept[i];
    kept[i] = kept[--n_kept];
    reused++;
  } else {
    /* Nothing fits: what is kept goes back before a new block is mapped. */
    for (int k = 0; k < n_kept; k++) __libc_free(kept[k].ptr);
    n_kept = 0;
    b.ptr = __libc_memalign(PAGE, size);
    if (!b.ptr) { pthread_mutex_unlock(&mu); return ENOMEM; }
    mapped++;
  }
  if (n_in_use < MAX_BLOCKS) {
    in_use[n_in_use] = b;
    __atomic_store_n(&n_in_use, n_in_use + 1, __ATOMIC_RELAXED);
  }  /* else untracked: free() hands it straight back to glibc */
  pthread_mutex_unlock(&mu);
  *out = b.ptr;
  return 0;
}

/* Removes `ptr` from the blocks in use; its size, or 0 if it is not one of them. */
static size_t untrack(void *ptr) {
  for (int i = 0; i < n_in_use; i++)
    if (in_use[i].ptr == ptr) {
      size_t size = in_use[i].size;
      in_use[i] = in_use[n_in_use - 1];
      __atomic_store_n(&n_in_use, n_in_use - 1, __ATOMIC_RELAXED);
      return size;
    }
  return 0;
}

void free(void *ptr) {
  if (ptr && __atomic_load_n(&n_in_use, __ATOMIC_RELAXED) > 0) {
    pthread_mutex_lock(&mu);
    size_t size = untrack(ptr);
    /* A block resized past this library's realloc (glibc's __libc_realloc called directly)
       may be a smaller chunk at the same address now: never keep that. */
    if (size && malloc_usable_size(ptr) >= size) {
      void *dropped = NULL;
      if (n_kept >= slots) {  /* keep at most `slots` blocks: drop one */
        dropped = kept[0].ptr;
        kept[0] = kept[--n_kept];
      }
      kept[n_kept++] = (block_t){ptr, size};
      pthread_cond_broadcast(&returned);
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
