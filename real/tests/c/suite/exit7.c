/* Tests: exit(7) called from a thread ends the whole program with status 7 (main never returns from joins). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/types.h>
#include <unistd.h>

pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
pthread_cond_t recorded = PTHREAD_COND_INITIALIZER;
int first_done;
pid_t pids[2];
volatile long sink;

static void *first(void *arg) {
    (void)arg;
    pids[0] = getpid();
    pthread_mutex_lock(&mu);
    first_done = 1;
    pthread_cond_signal(&recorded);
    pthread_mutex_unlock(&mu);
    return NULL;
}

static void *second(void *arg) {
    (void)arg;
    pids[1] = getpid();
    long s = 0;
    for (long i = 0; i < 100000; i++) s += i % 7;
    sink = s;
    pthread_mutex_lock(&mu);
    while (!first_done) pthread_cond_wait(&recorded, &mu);
    pthread_mutex_unlock(&mu);
    fprintf(stderr, "pids: %d\n", pids[0] == pids[1] ? 1 : 2);
    exit(7);
}

int main(void) {
    pthread_t a, b;
    printf("start\n");
    fflush(stdout);
    pthread_create(&a, NULL, first, NULL);
    pthread_create(&b, NULL, second, NULL);
    pthread_join(a, NULL);
    pthread_join(b, NULL);
    return 0; /* not reached: second() exits with 7 */
}
