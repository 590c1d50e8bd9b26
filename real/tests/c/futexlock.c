/* A mutex on gallocy's futex between two processes (usually on two nodes): the
 * classic futex mutex (Drepper, "Futexes are tricky", mutex 2) with gallocy_futex_wait
 * and gallocy_futex_wake in place of futex(2). `futexlock ME N` (ME is 0 or 1): each
 * process takes the lock N times; inside, it checks that the other is not inside and
 * increments a shared counter non-atomically, with the lock word, the flag and the
 * counter on three different pages. Process 0 allocates the state and publishes it in
 * the root block, waits for both to finish and prints "counter 2N, violations 0".
 * Both start together and hold the lock 200 us each time, so that they sleep in
 * futexes; each prints how often it slept ("sleeps S"). Exit 0 on success. */
#include <errno.h>
#include "share.h"

#define PAGE 4096

struct shared {
    uint32_t lock[PAGE / 4];             /* lock[0]: 0 free, 1 locked, 2 with waiters */
    volatile uint64_t inside[PAGE / 8];  /* [0] inside, [1] violations */
    volatile uint64_t counter[PAGE / 8]; /* [0] the counter, [1] done, [2] started */
};

static long sleeps;

static void lock(uint32_t *word) {
    uint32_t c = 0;
    if (__atomic_compare_exchange_n(word, &c, 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        return;
    if (c != 2) c = __atomic_exchange_n(word, 2, __ATOMIC_SEQ_CST);
    while (c != 0) {
        int r = gallocy_futex_wait(word, 2, 0);
        if (r == 0) sleeps++;
        else if (r != -EAGAIN) {
            fprintf(stderr, "futex wait: %s\n", gallocy_strerror(r));
            exit(20);
        }
        c = __atomic_exchange_n(word, 2, __ATOMIC_SEQ_CST);
    }
}

static void unlock(uint32_t *word) {
    if (__atomic_exchange_n(word, 0, __ATOMIC_SEQ_CST) == 2) {
        int r = gallocy_futex_wake(word, 1);
        if (r < 0) {
            fprintf(stderr, "futex wake: %s\n", gallocy_strerror(r));
            exit(21);
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    int me = atoi(argv[1]);
    long n = atol(argv[2]);
    struct shared *s = share_state("futexlock", me, sizeof(struct shared), PAGE, NULL);
    /* Start together, so that the two contend for the lock. */
    __atomic_fetch_add(&s->counter[2], 1, __ATOMIC_SEQ_CST);
    if (wait_for(&s->counter[2], 2, 60, 100) != 0) {
        fprintf(stderr, "the other process never started\n");
        return 14;
    }
    for (long i = 0; i < n; i++) {
        lock(&s->lock[0]);
        if (__atomic_fetch_add(&s->inside[0], 1, __ATOMIC_SEQ_CST) != 0)
            __atomic_fetch_add(&s->inside[1], 1, __ATOMIC_SEQ_CST);
        uint64_t seen = s->counter[0];
        s->counter[0] = seen + 1;
        usleep(200); /* hold it: the other process must sleep, not spin */
        __atomic_fetch_sub(&s->inside[0], 1, __ATOMIC_SEQ_CST);
        unlock(&s->lock[0]);
    }
    printf("sleeps %ld\n", sleeps);
    __atomic_fetch_add(&s->counter[1], 1, __ATOMIC_SEQ_CST);
    if (me == 1) return 0;
    if (wait_for(&s->counter[1], 2, 120, 1000) != 0) {
        fprintf(stderr, "process 1 never finished\n");
        return 13;
    }
    printf("counter %llu, violations %llu\n", (unsigned long long)s->counter[0],
           (unsigned long long)s->inside[1]);
    return s->counter[0] == (uint64_t)(2 * n) && s->inside[1] == 0 ? 0 : 1;
}
