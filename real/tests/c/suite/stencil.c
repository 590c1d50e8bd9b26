/* Tests: 1-D heat stencil over two global double buffers, 3 threads, pthread_barrier_wait between phases. */
#include <pthread.h>
#include <stdio.h>
#include <sys/types.h>
#include <unistd.h>

#define N 256
#define T 3
#define ITERS 50
double buf[2][N];
pthread_barrier_t bar;
pid_t pids[T + 1];

static void *work(void *arg) {
    int id = (int)(long)arg;
    pids[id] = getpid();
    int lo = 1 + id * (N - 2) / T, hi = 1 + (id + 1) * (N - 2) / T;
    for (int it = 0; it < ITERS; it++) {
        double *src = buf[it & 1], *dst = buf[(it + 1) & 1];
        for (int i = lo; i < hi; i++) dst[i] = src[i] + 0.25 * (src[i - 1] - 2 * src[i] + src[i + 1]);
        pthread_barrier_wait(&bar);
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
    for (int i = 0; i < N; i++) buf[0][i] = buf[1][i] = (i % 32 < 16) ? 100.0 : 0.0;
    buf[0][0] = buf[1][0] = buf[0][N - 1] = buf[1][N - 1] = 50.0; /* fixed boundaries */
    pthread_barrier_init(&bar, NULL, T);
    for (long i = 0; i < T; i++) pthread_create(&th[i], NULL, work, (void *)i);
    for (int i = 0; i < T; i++) pthread_join(th[i], NULL);
    pids[T] = getpid();
    double sum = 0, wsum = 0;
    const double *r = buf[ITERS & 1];
    for (int i = 0; i < N; i++) { sum += r[i]; wsum += r[i] * (i + 1); }
    printf("stencil: sum %.6f, weighted %.6f, mid %.6f\n", sum, wsum, r[N / 2]);
    fprintf(stderr, "pids: %d\n", distinct(pids, T + 1));
    return 0;
}
