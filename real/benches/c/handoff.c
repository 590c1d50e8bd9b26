/* Mutex + condition variable hand-off between two threads (nodes 2 and 3 under round
 * robin): a turn passes back and forth, each waiter sleeping in pthread_cond_wait.
 * Prints microseconds per hand-off. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t changed = PTHREAD_COND_INITIALIZER;
static long turn;
static long turns;

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static void *player(void *arg) {
    long me = (long)arg;
    for (long i = me; i < turns; i += 2) {
        pthread_mutex_lock(&lock);
        while (turn != i)
            pthread_cond_wait(&changed, &lock);
        turn = i + 1;
        pthread_cond_broadcast(&changed);
        pthread_mutex_unlock(&lock);
    }
    return NULL;
}

int main(int argc, char **argv) {
    turns = argc > 1 ? atol(argv[1]) : 600;
    pthread_t a, b;
    double start = now_us();
    pthread_create(&a, NULL, player, (void *)0L);
    pthread_create(&b, NULL, player, (void *)1L);
    pthread_join(a, NULL);
    pthread_join(b, NULL);
    printf("us_per_op %.2f\n", (now_us() - start) / turns);
    return 0;
}
