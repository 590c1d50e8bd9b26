/* Three threads (one per node under round robin on three nodes) meet at a
 * pthread_barrier_t repeatedly. Prints microseconds per barrier round. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static pthread_barrier_t barrier;
static long rounds;

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static void *member(void *arg) {
    for (long i = 0; i < rounds; i++)
        pthread_barrier_wait(&barrier);
    return arg;
}

int main(int argc, char **argv) {
    rounds = argc > 1 ? atol(argv[1]) : 300;
    pthread_barrier_init(&barrier, NULL, 3);
    pthread_t t[3];
    double start = now_us();
    for (int i = 0; i < 3; i++)
        pthread_create(&t[i], NULL, member, NULL);
    for (int i = 0; i < 3; i++)
        pthread_join(t[i], NULL);
    printf("us_per_op %.2f\n", (now_us() - start) / rounds);
    return 0;
}
