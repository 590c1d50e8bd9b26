/* What fork costs a program whose heap is in a gallocy space: the child copies every
 * readable page of the space before the forking thread goes on (docs/preload.md).
 * Run under `gallocy run`; prints the heap size and the median time of fork() returning
 * in the parent, child exit included, for a small heap and for HEAP_MIB MiB. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Median wall time of fork + the child's _exit + waitpid. */
static double fork_cost(int rounds) {
    double samples[16];
    for (int i = 0; i < rounds; i++) {
        double start = now_s();
        pid_t child = fork();
        if (child == 0) _exit(0);
        if (child < 0) { perror("fork"); exit(1); }
        waitpid(child, NULL, 0);
        samples[i] = now_s() - start;
    }
    qsort(samples, rounds, sizeof samples[0], cmp);
    return samples[rounds / 2];
}

int main(int argc, char **argv) {
    long heap_mib = argc > 1 ? atol(argv[1]) : 1024;
    char *small = malloc(4096);
    memset(small, 1, 4096);
    printf("heap %6ld MiB: fork %8.3f ms (median of 5)\n", 0L, fork_cost(5) * 1e3);
    size_t bytes = (size_t)heap_mib << 20;
    double start = now_s();
    char *big = malloc(bytes);
    if (!big) { perror("malloc"); return 1; }
    memset(big, 7, bytes);
    printf("touched %ld MiB in %.2f s\n", heap_mib, now_s() - start);
    printf("heap %6ld MiB: fork %8.3f ms (median of 3)\n", heap_mib, fork_cost(3) * 1e3);
    fflush(stdout);
    return big[bytes - 1] == 7 ? 0 : 2;
}
