/* Tests: bounded global queue with a mutex and two condvars (not_empty, not_full); 1 producer, 3 consumers. */
#include <pthread.h>
#include <stdio.h>
#include <sys/types.h>
#include <unistd.h>

#define ITEMS 200
#define CAP 8
#define T 3
int queue[CAP], head, tail, count, done;
pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
pthread_cond_t not_empty = PTHREAD_COND_INITIALIZER, not_full = PTHREAD_COND_INITIALIZER;
long totals[T], counts[T];
pid_t pids[T + 1];

static void *consumer(void *arg) {
    int id = (int)(long)arg;
    pids[id] = getpid();
    for (;;) {
        pthread_mutex_lock(&mu);
        while (count == 0 && !done) pthread_cond_wait(&not_empty, &mu);
        if (count == 0 && done) { pthread_mutex_unlock(&mu); break; }
        int v = queue[head];
        head = (head + 1) % CAP;
        count--;
        pthread_cond_signal(&not_full);
        pthread_mutex_unlock(&mu);
        totals[id] += v;
        counts[id]++;
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
    for (long i = 0; i < T; i++) pthread_create(&th[i], NULL, consumer, (void *)i);
    for (int i = 1; i <= ITEMS; i++) {
        pthread_mutex_lock(&mu);
        while (count == CAP) pthread_cond_wait(&not_full, &mu);
        queue[tail] = i;
        tail = (tail + 1) % CAP;
        count++;
        pthread_cond_signal(&not_empty);
        pthread_mutex_unlock(&mu);
    }
    pthread_mutex_lock(&mu);
    done = 1;
    pthread_cond_broadcast(&not_empty);
    pthread_mutex_unlock(&mu);
    for (int i = 0; i < T; i++) pthread_join(th[i], NULL);
    pids[T] = getpid();
    long total = 0, n = 0;
    for (int i = 0; i < T; i++) { total += totals[i]; n += counts[i]; }
    long expect = (long)ITEMS * (ITEMS + 1) / 2;
    printf("workqueue: total %ld (expected %ld), items %ld\n", total, expect, n);
    fprintf(stderr, "pids: %d\n", distinct(pids, T + 1));
    return total == expect && n == ITEMS ? 0 : 1;
}
