/* gallocy: a distributed shared memory allocator. Explicit C API.
 *
 * Link with -lgallocy (target/release/libgallocy.so). The daemon's socket comes from
 * $GALLOCY_SOCKET. Every function is safe to call from any thread after
 * gallocy_attach() returned 0. None of them calls the system allocator.
 */
#ifndef GALLOCY_H
#define GALLOCY_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Exit status of a process whose daemon went away while it ran. */
#define GALLOCY_EXIT_DAEMON_GONE 86
/* Exit status of a process whose page fault could not be served (page lost, ...). */
#define GALLOCY_EXIT_FAULT_FAILED 87

/* Join (or create) the space named `space` on the daemon at $GALLOCY_SOCKET; map it at
 * its fixed address. 0 or a negative errno; gallocy_last_error() says why. A space is
 * destroyed, with its contents, when its last process on every node has gone, unless
 * the process that created it had GALLOCY_PERSISTENT=1 in its environment (then it
 * stays until `gallocy space unpersist NAME`, and ends with its last process after). */
int gallocy_attach(const char *space);
/* Like gallocy_attach, but fails with -ENOENT if the space does not exist. */
int gallocy_attach_existing(const char *space);
/* Unmap the space and close the connection. 0 or a negative errno. */
int gallocy_detach(void);

void *gallocy_malloc(size_t size);
void *gallocy_calloc(size_t n, size_t size);
void *gallocy_realloc(void *ptr, size_t size);
void gallocy_free(void *ptr);
/* Usable size of a block returned by gallocy_malloc and friends. */
size_t gallocy_usable_size(void *ptr);

/* A zero-initialised root block, at the same address in every process of the space. */
void *gallocy_root(void);
/* At least 64 KiB. */
size_t gallocy_root_size(void);

/* One round trip to the daemon; 0 on success or a negative errno. */
int gallocy_ping(void);

/* A futex on a 32-bit word of the space that works across nodes (docs/protocol.md,
 * "Futexes"). gallocy_futex_wait sleeps while *addr == expected, at most timeout_ms
 * (0: no limit): 0 when woken (wake-ups can be spurious: check the condition again),
 * -EAGAIN if the word differs, -ETIMEDOUT, or another negative errno.
 * gallocy_futex_wake wakes up to count waiters on addr on this node and on each
 * other node (so a wake across nodes can wake more than count: spurious
 * wake-ups); it returns how many it woke in all, or a negative errno. */
int gallocy_futex_wait(const uint32_t *addr, uint32_t expected, uint32_t timeout_ms);
int gallocy_futex_wake(const uint32_t *addr, uint32_t count);

/* Threads of a program started by `gallocy run` (docs/runtime.md, "Threads on every
 * node"), with pthread's signatures. gallocy_pthread_create places the thread by the
 * program's policy (round robin over the nodes; GALLOCY_PLACEMENT=local keeps it
 * here); gallocy_pthread_create_on places it on `node` (1-based). The handle works with
 * gallocy_pthread_join (and, under LD_PRELOAD, with pthread_join and pthread_detach).
 * Outside a launched program, create makes a plain local thread and create_on fails
 * with ENOTSUP. Return 0 or an errno, as pthread's do. */
#include <pthread.h>
int gallocy_pthread_create(pthread_t *thread, const pthread_attr_t *attr,
                           void *(*start)(void *), void *arg);
int gallocy_pthread_create_on(pthread_t *thread, const pthread_attr_t *attr,
                              void *(*start)(void *), void *arg, uint32_t node);
int gallocy_pthread_join(pthread_t thread, void **result);

/* Returns once every write this process made to the space before the call is on k
 * nodes (the space's replicas, GALLOCY_REPLICAS when it was created, else the daemon's
 * default of 2; every node up, if fewer are): those writes survive the loss of any
 * k - 1 nodes counted from the write (lost copies are made again only when the page is
 * next shared or flushed, not at once). Writes no other node's process has seen and
 * no sync covered may be lost with their node. With k = 1 it returns at once. Under
 * LD_PRELOAD, msync(2) on space memory does the same. 0 or a negative errno (-EAGAIN:
 * too many syncs waiting on the node; -EIO: the node was evicted). See
 * docs/protocol.md "Replication". */
int gallocy_sync(void);

struct gallocy_stats {
    uint64_t faults_local;   /* faults this node served without the network */
    uint64_t faults_remote;  /* faults that needed another node */
    uint64_t frames_sent;
    uint64_t frames_received;
    uint64_t allocations;
    uint32_t pages_held;     /* pages this node holds read or write */
    uint32_t node_id;        /* the node this process is attached to */
};
/* The node's counters. 0 or a negative errno. */
int gallocy_stats(struct gallocy_stats *out);

/* A description of the last error of gallocy_attach (or of another call), valid until
 * the next failing call. Never NULL. */
const char *gallocy_last_error(void);
/* A description of a negative errno returned by a gallocy call. Never NULL. */
const char *gallocy_strerror(int error);

#ifdef __cplusplus
}
#endif

#endif /* GALLOCY_H */
