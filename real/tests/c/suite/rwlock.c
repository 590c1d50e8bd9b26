/* Tests: pthread_rwlock_t over a global array; 2 writers increment all elements, 2 readers check they are equal. */
#include <pthread.h>
#include <stdio.h>
#include <sys/types.h>
#include <unistd.h>

#define N 16
#define WRITERS 2
#define READERS 2
#define WROUNDS 50
#define RROUNDS 100
int arr[N];
pthread_rwlock_t rw = PTHREAD_RWLOCK_INITIALIZER;
long violations[READERS];
pid_t pids[WRITERS + READERS + 1];

static void *writer(void *arg) {
    int id = (int)(long)arg;
    pids[id] = getpid();
    for (int r = 0; r < WROUNDS; r++) {
        pthread_rwlock_wrlock(&rw);
        for (int i = 0; i < N; i++) arr[i]++;
        pthread_rwlock_unlock(&rw);
    }
    return NULL;
}

static void *reader(void *arg) {
    int id = (int)(long)arg;
    pids[WRITERS + id] = getpid();
    for (int r = 0; r < RROUNDS; r++) {
        pthread_rwlock_rdlock(&rw);
        for (int i = 1; i < N; i++) violations[id] += arr[i] != arr[0];
        pthread_rwlock_unlock(&rw);
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
    pthread_t th[WRITERS + READERS];
    for (long i = 0; i < WRITERS; i++) pthread_create(&th[i], NULL, writer, (void *)i);
    for (long i = 0; i < READERS; i++) pthread_create(&th[WRITERS + i], NULL, reader, (void *)i);
    for (int i = 0; i < WRITERS + READERS; i++) pthread_join(th[i], NULL);
    pids[WRITERS + READERS] = getpid();
    long v = 0;
    for (int i = 0; i < READERS; i++) v += violations[i];
    int same = 1;
    for (int i = 1; i < N; i++) same &= arr[i] == arr[0];
    printf("rwlock: final %d (expected %d), all equal %d, violations %ld\n", arr[0], WRITERS * WROUNDS, same, v);
    fprintf(stderr, "pids: %d\n", distinct(pids, WRITERS + READERS + 1));
    return arr[0] == WRITERS * WROUNDS && same && v == 0 ? 0 : 1;
}
