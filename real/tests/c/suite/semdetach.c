/* Tests: a detached thread (attr DETACHED) signals main through a global unnamed sem_t; plus one joinable thread. */
#include <pthread.h>
#include <semaphore.h>
#include <stdio.h>
#include <sys/types.h>
#include <unistd.h>

sem_t sem;
long result;
pid_t pids[3];

static void *detached(void *arg) {
    (void)arg;
    pids[0] = getpid();
    long s = 0;
    for (long i = 1; i <= 1000; i++) s += i * i;
    result = s;
    sem_post(&sem);
    return NULL;
}

static void *joinable(void *arg) {
    (void)arg;
    pids[1] = getpid();
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
    pthread_t d, j;
    pthread_attr_t attr;
    sem_init(&sem, 0, 0);
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_create(&d, &attr, detached, NULL);
    pthread_attr_destroy(&attr);
    pthread_create(&j, NULL, joinable, NULL);
    pthread_join(j, NULL);
    while (sem_wait(&sem) != 0) {}
    pids[2] = getpid();
    printf("semdetach: result %ld (expected 333833500)\n", result);
    fprintf(stderr, "pids: %d\n", distinct(pids, 3));
    return result == 333833500 ? 0 : 1;
}
