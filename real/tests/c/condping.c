/* glibc's own mutex, condition variable and barrier (process-shared, unmodified) in
 * space memory, between two processes (usually on two nodes). `condping ME N` (ME is
 * 0 or 1): after a barrier, the two take turns N times each: lock; wait on the
 * condition variable until it is ME's turn; count; pass the turn; broadcast; unlock.
 * Every turn is a wake-up across the two processes. Process 0 allocates and
 * initialises the state and publishes it in the root block, and prints
 * "turns 2N, count 2N" at the end. Exit 0 on success. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "gallocy.h"

struct shared {
    pthread_mutex_t mutex;
    pthread_cond_t turn_changed;
    pthread_barrier_t start, end;
    int turn;
    long turns;
    long count;
};

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    int me = atoi(argv[1]);
    long n = atol(argv[2]);
    if (gallocy_attach("condping") != 0) {
        fprintf(stderr, "attach: %s\n", gallocy_last_error());
        return 10;
    }
    volatile uint64_t *root = gallocy_root();
    struct shared *s;
    if (me == 0) {
        s = gallocy_malloc(sizeof *s);
        if (!s) return 11;
        memset(s, 0, sizeof *s);
        pthread_mutexattr_t ma;
        pthread_mutexattr_init(&ma);
        pthread_mutexattr_setpshared(&ma, PTHREAD_PROCESS_SHARED);
        pthread_mutex_init(&s->mutex, &ma);
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_condattr_setpshared(&ca, PTHREAD_PROCESS_SHARED);
        pthread_cond_init(&s->turn_changed, &ca);
        pthread_barrierattr_t ba;
        pthread_barrierattr_init(&ba);
        pthread_barrierattr_setpshared(&ba, PTHREAD_PROCESS_SHARED);
        pthread_barrier_init(&s->start, &ba, 2);
        pthread_barrier_init(&s->end, &ba, 2);
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
    pthread_barrier_wait(&s->start);
    for (long i = 0; i < n; i++) {
        pthread_mutex_lock(&s->mutex);
        while (s->turn != me) pthread_cond_wait(&s->turn_changed, &s->mutex);
        s->count++;
        s->turns++;
        s->turn = 1 - me;
        pthread_cond_broadcast(&s->turn_changed);
        pthread_mutex_unlock(&s->mutex);
    }
    pthread_barrier_wait(&s->end);
    if (me == 0) printf("turns %ld, count %ld\n", s->turns, s->count);
    return s->turns == 2 * n && s->count == 2 * n ? 0 : 1;
}
