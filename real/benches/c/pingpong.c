/* Write ping-pong between two threads (placed on nodes 2 and 3 by round robin): each
 * turn writes the shared word's page on the other node, one page transfer per turn
 * (after the first touch). Prints microseconds per turn. */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static _Atomic long turn;
static long turns;

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static void *player(void *arg) {
    long me = (long)arg;
    for (long i = me; i < turns; i += 2) {
        /* Yield while waiting: this machine's two cores also run three daemons. */
        while (atomic_load(&turn) != i)
            sched_yield();
        atomic_store(&turn, i + 1);
    }
    return NULL;
}

int main(int argc, char **argv) {
    turns = argc > 1 ? atol(argv[1]) : 2000;
    pthread_t a, b;
    double start = now_us();
    pthread_create(&a, NULL, player, (void *)0L);
    pthread_create(&b, NULL, player, (void *)1L);
    pthread_join(a, NULL);
    pthread_join(b, NULL);
    printf("us_per_op %.2f\n", (now_us() - start) / turns);
    return 0;
}
