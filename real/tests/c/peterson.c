/* Peterson's mutual exclusion between two processes (usually on two nodes): only
 * sequential consistency makes it correct. `peterson ME N` (ME is 0 or 1): each
 * process enters the critical section N times; inside, it checks that the other is not
 * inside and increments a shared counter non-atomically. The lock's words and the
 * counter are on four different pages, so every handoff moves pages between nodes.
 * Process 0 allocates the state and publishes it in the root block; it waits for both
 * to finish and prints "counter 2N, violations 0". Exit 0 on success. */
#include "share.h"

#define PAGE 4096

struct shared {
    volatile uint64_t flag[2][PAGE / 8];  /* flag[i][0]: i wants in (one page each) */
    volatile uint64_t turn[PAGE / 8];
    volatile uint64_t counter[PAGE / 8];  /* [0] the counter, [1] inside, [2] violations, [3] done */
};

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    int me = atoi(argv[1]), other = 1 - me;
    long n = atol(argv[2]);
    struct shared *s = share_state("peterson", me, sizeof(struct shared), PAGE, NULL);
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
    if (wait_for(&s->counter[3], 2, 120, 1000) != 0) {
        fprintf(stderr, "process 1 never finished\n");
        return 13;
    }
    printf("counter %llu, violations %llu\n", (unsigned long long)s->counter[0],
           (unsigned long long)s->counter[2]);
    return s->counter[0] == (uint64_t)(2 * n) && s->counter[2] == 0 ? 0 : 1;
}
