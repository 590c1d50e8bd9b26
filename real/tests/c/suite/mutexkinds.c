/* Mutex kinds and timed waits across nodes: recursive and errorcheck mutexes, trylock,
 * timedlock, pthread_cond_signal and pthread_cond_timedwait, with the threads on other
 * nodes. Prints counts only main computes. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

#define THREADS 3
#define ROUNDS 40

static pthread_mutex_t recursive, errorcheck, timed = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t ready = PTHREAD_COND_INITIALIZER;
/* Each counter has its own lock. */
static long counter_recursive, counter, signals, timeouts, busy, deadlocks;
static int pids[THREADS + 1];

static struct timespec in_ms(long ms) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    t.tv_nsec += ms * 1000000L;
    t.tv_sec += t.tv_nsec / 1000000000L;
    t.tv_nsec %= 1000000000L;
    return t;
}

static void *work(void *arg) {
    int id = *(int *)arg;
    pids[id] = getpid();
    for (int i = 0; i < ROUNDS; i++) {
        pthread_mutex_lock(&recursive);
        pthread_mutex_lock(&recursive);
        counter_recursive++;
        pthread_mutex_unlock(&recursive);
        pthread_mutex_unlock(&recursive);
        struct timespec limit = in_ms(5000);
        if (pthread_mutex_timedlock(&timed, &limit) == 0) {
            counter++;
            pthread_mutex_unlock(&timed);
        }
    }
    pthread_mutex_lock(&errorcheck);
    if (pthread_mutex_lock(&errorcheck) == EDEADLK)
        __atomic_fetch_add(&deadlocks, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&errorcheck);
    /* Wait to be signalled by main, one thread at a time. */
    pthread_mutex_lock(&lock);
    while (signals <= id)
        pthread_cond_wait(&ready, &lock);
    pthread_mutex_unlock(&lock);
    return NULL;
}

int main(void) {
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&recursive, &attr);
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK);
    pthread_mutex_init(&errorcheck, &attr);
    pthread_t threads[THREADS];
    int ids[THREADS];
    for (int i = 0; i < THREADS; i++) {
        ids[i] = i;
        pthread_create(&threads[i], NULL, work, &ids[i]);
    }
    /* trylock while another thread may hold it: EBUSY or success, never wrong. */
    for (int i = 0; i < ROUNDS; i++) {
        int r = pthread_mutex_trylock(&timed);
        if (r == 0) {
            counter++;
            pthread_mutex_unlock(&timed);
        } else if (r == EBUSY) {
            busy++;
            pthread_mutex_lock(&timed);
            counter++;
            pthread_mutex_unlock(&timed);
        }
    }
    /* A timed wait nobody signals times out. */
    pthread_mutex_lock(&lock);
    struct timespec limit = in_ms(50);
    if (pthread_cond_timedwait(&ready, &lock, &limit) == ETIMEDOUT)
        timeouts++;
    pthread_mutex_unlock(&lock);
    for (int i = 0; i < THREADS; i++) {
        pthread_mutex_lock(&lock);
        signals++;
        pthread_cond_broadcast(&ready);
        pthread_mutex_unlock(&lock);
    }
    for (int i = 0; i < THREADS; i++)
        pthread_join(threads[i], NULL);
    pids[THREADS] = getpid();
    int distinct = 0;
    for (int i = 0; i <= THREADS; i++) {
        int seen = 0;
        for (int j = 0; j < i; j++)
            seen |= pids[j] == pids[i];
        distinct += !seen;
    }
    printf("mutexkinds: counter %ld (expected %d), deadlocks detected %ld, timed out %ld\n",
           counter_recursive + counter, THREADS * ROUNDS * 2 + ROUNDS, deadlocks, timeouts);
    fprintf(stderr, "pids: %d\n", distinct);
    return 0;
}
