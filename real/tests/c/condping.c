/* glibc's own mutex, condition variable and barrier (process-shared, unmodified) in
 * space memory, between two processes (usually on two nodes). `condping ME N` (ME is
 * 0 or 1): after a barrier, the two take turns N times each: lock; wait on the
 * condition variable until it is ME's turn; count; pass the turn; broadcast; unlock.
 * Every turn is a wake-up across the two processes. Process 0 allocates and
 * initialises the state and publishes it in the root block, and prints
 * "turns 2N, count 2N" at the end. Exit 0 on success. */
#include <pthread.h>
#include "share.h"

struct shared {
    pthread_mutex_t mutex;
    pthread_cond_t turn_changed;
    pthread_barrier_t start, end;
    int turn;
    long turns;
    long count;
};

/* Process-shared objects, initialised before the other process can see them. */
static void init_shared(void *state) {
    struct shared *s = state;
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
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    int me = atoi(argv[1]);
    long n = atol(argv[2]);
    struct shared *s = share_state("condping", me, sizeof(struct shared), 16, init_shared);
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
