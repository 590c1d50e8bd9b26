/* Tests: pthread_once from 4 threads runs init exactly once and its result is visible to all. */
#include <pthread.h>
#include <stdio.h>
#include <sys/types.h>
#include <unistd.h>

#define T 4
pthread_once_t once = PTHREAD_ONCE_INIT;
int init_calls, value, seen[T];
pid_t pids[T + 1];

static void init(void) {
    init_calls++;
    value = 4242;
}

static void *work(void *arg) {
    int id = (int)(long)arg;
    pids[id] = getpid();
    pthread_once(&once, init);
    seen[id] = value;
    return NULL;
}

static int distinct(pid_t *p, int n) {
    int d = 0;
    for (int i = 0; i < n; i++) {
        int s = 0;
        for (int j = 0; j < i; j++) s |= p[j] == p[i];
        d += !s;
    }
    return d;
}

int main(void) {
    pthread_t th[T];
    for (long i = 0; i < T; i++) pthread_create(&th[i], NULL, work, (void *)i);
    for (int i = 0; i < T; i++) pthread_join(th[i], NULL);
    pids[T] = getpid();
    int ok = 1;
    for (int i = 0; i < T; i++) ok &= seen[i] == 4242;
    printf("once: init calls %d, value %d, all threads saw it %d\n", init_calls, value, ok);
    fprintf(stderr, "pids: %d\n", distinct(pids, T + 1));
    return init_calls == 1 && ok ? 0 : 1;
}
