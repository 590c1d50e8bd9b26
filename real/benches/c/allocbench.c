/* Allocator micro-benchmark: small random sizes.
 *   allocbench single N          malloc+free pairs, one thread
 *   allocbench threads N         2 threads, each N pairs, half the frees cross-thread
 * Prints nanoseconds per malloc+free pair, timed inside the program. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define WINDOW 64

static long rounds;

/* Keeps a window of live blocks so frees are not always of the last block. */
static void *single(void *arg) {
    (void)arg;
    void *live[WINDOW] = {0};
    unsigned seed = 42;
    for (long i = 0; i < rounds; i++) {
        int slot = rand_r(&seed) % WINDOW;
        free(live[slot]);
        live[slot] = malloc(8 + rand_r(&seed) % 248);
        *(volatile char *)live[slot] = 1;
    }
    for (int i = 0; i < WINDOW; i++) free(live[i]);
    return NULL;
}

#define RING 4096
static void *volatile ring[2][RING];

/* Thread t allocates; half its blocks are freed by the other thread. */
static void *crossing(void *arg) {
    int me = (int)(intptr_t)arg;
    unsigned seed = 7 + me;
    void *live[WINDOW] = {0};
    for (long i = 0; i < rounds; i++) {
        int slot = rand_r(&seed) % WINDOW;
        void *p = malloc(8 + rand_r(&seed) % 248);
        *(volatile char *)p = 1;
        if (i & 1) {
            /* Hand it to the other thread; free whatever it left us. */
            void *theirs = __atomic_exchange_n(&ring[1 - me][i % RING], p, __ATOMIC_ACQ_REL);
            free(theirs);
        } else {
            free(live[slot]);
            live[slot] = p;
        }
    }
    for (int i = 0; i < WINDOW; i++) free(live[i]);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    rounds = atol(argv[2]);
    double start = now();
    if (!strcmp(argv[1], "single")) {
        single(NULL);
    } else {
        pthread_t t[2];
        for (int i = 0; i < 2; i++) pthread_create(&t[i], NULL, crossing, (void *)(intptr_t)i);
        for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
    }
    double elapsed = now() - start;
    long pairs = !strcmp(argv[1], "single") ? rounds : 2 * rounds;
    printf("%.2f\n", elapsed * 1e9 / pairs);
    return 0;
}
