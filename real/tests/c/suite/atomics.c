/* Tests: C11 atomic_fetch_add and __sync_fetch_and_add on global counters from 4 threads. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/types.h>
#include <unistd.h>

#define T 4
#define ITERS 2000
_Atomic long c11_counter;
long sync_counter;
pid_t pids[T + 1];

static void *work(void *arg) {
    int id = (int)(long)arg;
    pids[id] = getpid();
    for (int i = 0; i < ITERS; i++) {
        atomic_fetch_add(&c11_counter, 1);
        __sync_fetch_and_add(&sync_counter, 1);
    }
    return NULL;
}

static int distinct(pid_t *p, int n) {
    int d = 0;
    for (int i = 0; i < n; i++) {
        int seen = 0;
        for (int j = 0; j < i; j++) seen |= p[j] == p[i];
        d += !seen;
    }
    return d;
}

int main(void) {
    pthread_t th[T];
    for (long i = 0; i < T; i++) pthread_create(&th[i], NULL, work, (void *)i);
    for (int i = 0; i < T; i++) pthread_join(th[i], NULL);
    pids[T] = getpid();
    long a = atomic_load(&c11_counter), s = __sync_fetch_and_add(&sync_counter, 0);
    printf("atomics: c11 %ld, sync %ld (expected %d each)\n", a, s, T * ITERS);
    fprintf(stderr, "pids: %d\n", distinct(pids, T + 1));
    return a == T * ITERS && s == T * ITERS ? 0 : 1;
}
