/* Peterson's mutual exclusion between two processes (usually on two nodes): only
 * sequential consistency makes it correct. `peterson ME N` (ME is 0 or 1): each
 * process enters the critical section N times; inside, it checks that the other is not
 * inside and increments a shared counter non-atomically. The lock's words and the
 * counter are on four different pages, so every handoff moves pages between nodes.
 * Process 0 allocates the state and publishes it in the root block; it waits for both
 * to finish and prints "counter 2N, violations 0". Exit 0 on success. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "gallocy.h"

#define PAGE 4096

struct shared {
    volatile uint64_t flag[2][PAGE / 8];  /* flag[i][0]: i wants in (one page each) */
    volatile uint64_t turn[PAGE / 8];
    volatile uint64_t counter[PAGE / 8];  /* [0] the counter, [1] inside, [2] violations, [3] done */
};

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    int me = atoi(argv[1]), other = 1 - me;
    long n = atol(argv[2]);
    if (gallocy_attach("peterson") != 0) {
        fprintf(stderr, "attach: %s\n", gallocy_last_error());
        return 10;
    }
    volatile uint64_t *root = gallocy_root();
    struct shared *s;
    if (me == 0) {
        s = gallocy_malloc(sizeof *s + PAGE);
        if (!s) return 11;
        s = (struct shared *)(((uintptr_t)s + PAGE - 1) & ~(uintptr_t)(PAGE - 1));
        memset((void *)s, 0, sizeof *s);
        __atomic_store_n(&root[0], (uint64_t)s, __ATOMIC_SEQ_CST);
    } else {
        double deadline = now_s() + 60;
        while (__atomic_load_n(&root[0], __ATOMIC_SEQ_CST) == 0) {
            if (now_s() > deadline) {
                fprintf(stderr, "process 0 never published\n");
                return 12;
            }
            usleep(1000);
        }
        s = (struct shared *)root[0];
    }
    for (long i = 0; i < n; i++) {
        __atomic_store_n(&s->flag[me][0], 1, __ATOMIC_SEQ_CST);
        __atomic_store_n(&s->turn[0], (uint64_t)other, __ATOMIC_SEQ_CST);
        while (__atomic_load_n(&s->flag[other][0], __ATOMIC_SEQ_CST) &&
               __atomic_load_n(&s->turn[0], __ATOMIC_SEQ_CST) == (uint64_t)other) {
        }
        if (__atomic_fetch_add(&s->counter[1], 1, __ATOMIC_SEQ_CST) != 0)
            __atomic_fetch_add(&s->counter[2], 1, __ATOMIC_SEQ_CST);
        uint64_t seen = s->counter[0];
        s->counter[0] = seen + 1;
        __atomic_fetch_sub(&s->counter[1], 1, __ATOMIC_SEQ_CST);
        __atomic_store_n(&s->flag[me][0], 0, __ATOMIC_SEQ_CST);
    }
    __atomic_fetch_add(&s->counter[3], 1, __ATOMIC_SEQ_CST);
    if (me == 1) return 0;
    double deadline = now_s() + 120;
    while (__atomic_load_n(&s->counter[3], __ATOMIC_SEQ_CST) != 2) {
        if (now_s() > deadline) {
            fprintf(stderr, "process 1 never finished\n");
            return 13;
        }
        usleep(1000);
    }
    printf("counter %llu, violations %llu\n", (unsigned long long)s->counter[0],
           (unsigned long long)s->counter[2]);
    return s->counter[0] == (uint64_t)(2 * n) && s->counter[2] == 0 ? 0 : 1;
}
