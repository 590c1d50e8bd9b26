/* What the two-process test programs (peterson.c, futexlock.c, condping.c) share:
 * attaching, publishing one state block through the root block, and bounded waits. */
#ifndef GALLOCY_TEST_SHARE_H
#define GALLOCY_TEST_SHARE_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "gallocy.h"

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

/* Waits until *word == value, polling every poll_us; 0, or -1 after `seconds`. */
static int wait_for(volatile uint64_t *word, uint64_t value, double seconds, useconds_t poll_us) {
    double deadline = now_s() + seconds;
    while (__atomic_load_n(word, __ATOMIC_SEQ_CST) != value) {
        if (now_s() > deadline) return -1;
        usleep(poll_us);
    }
    return 0;
}

/* Attaches to `space`. Process 0 (`me` == 0) allocates `size` bytes aligned to `align`
 * (a power of two), zeroes them, calls `init` on them (if not NULL) and publishes them
 * in the root block; the other process waits up to 60 s for them. Exits 10 if the
 * attach fails, 11 if the allocation does, 12 if process 0 never published. */
static void *share_state(const char *space, int me, size_t size, size_t align,
                         void (*init)(void *)) {
    if (gallocy_attach(space) != 0) {
        fprintf(stderr, "attach: %s\n", gallocy_last_error());
        exit(10);
    }
    volatile uint64_t *root = gallocy_root();
    if (me != 0) {
        double deadline = now_s() + 60;
        while (__atomic_load_n(&root[0], __ATOMIC_SEQ_CST) == 0) {
            if (now_s() > deadline) {
                fprintf(stderr, "process 0 never published\n");
                exit(12);
            }
            usleep(1000);
        }
        return (void *)root[0];
    }
    void *block = gallocy_malloc(size + align);
    if (!block) exit(11);
    void *state = (void *)(((uintptr_t)block + align - 1) & ~(uintptr_t)(align - 1));
    memset(state, 0, size);
    if (init) init(state);
    __atomic_store_n(&root[0], (uint64_t)state, __ATOMIC_SEQ_CST);
    return state;
}

#endif
