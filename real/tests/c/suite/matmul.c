/* Tests: global arrays shared by 4 threads computing row bands of C = A*B; ids passed via main's stack. */
#include <pthread.h>
#include <stdio.h>
#include <sys/types.h>
#include <unistd.h>

#define N 24
#define T 4
int A[N][N], B[N][N], C[N][N];
pid_t pids[T + 1];

static void *work(void *arg) {
    int id = *(int *)arg;
    pids[id] = getpid();
    for (int i = id * N / T; i < (id + 1) * N / T; i++)
        for (int j = 0; j < N; j++) {
            int s = 0;
            for (int k = 0; k < N; k++) s += A[i][k] * B[k][j];
            C[i][j] = s;
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
    int ids[T];
    pthread_t th[T];
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) { A[i][j] = i + 2 * j - 5; B[i][j] = (i * j) % 7 - 3; }
    for (int i = 0; i < T; i++) { ids[i] = i; pthread_create(&th[i], NULL, work, &ids[i]); }
    for (int i = 0; i < T; i++) pthread_join(th[i], NULL);
    pids[T] = getpid();
    long sum = 0, wsum = 0;
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) { sum += C[i][j]; wsum += (long)C[i][j] * (i * N + j + 1); }
    printf("matmul %dx%d: sum %ld, weighted %ld, C[5][7] %d\n", N, N, sum, wsum, C[5][7]);
    fprintf(stderr, "pids: %d\n", distinct(pids, T + 1));
    return 0;
}
