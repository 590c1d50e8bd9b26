/* Runs itself as a child N times (fork + exec, waiting for each), then allocates and
 * touches 1 MiB. A `child` allocates and touches 256 KiB and exits with it live; with
 * `spawner N free`, a child allocates blocks of every kind, frees them all and exits.
 * Under `gallocy run`, the children are exec'd descendants of the program. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define FREED_BLOCKS 4000

/* Allocates blocks of every kind (small, big, a large one in 400) and frees them all.
 * No stdio (its buffers would stay live) and no thread (glibc keeps a finished thread's
 * TLS vector, a calloc'd block, with its cached stack). */
static int child_that_frees(void) {
    static void *blocks[FREED_BLOCKS];
    static const size_t sizes[] = {16, 48, 200, 1000, 5000, 40000, 200000};
    for (int i = 0; i < FREED_BLOCKS; i++) {
        blocks[i] = malloc(i % 400 == 0 ? 3 << 20 : sizes[i % 7]);
        if (!blocks[i]) return 4;
        memset(blocks[i], i, 16);
    }
    for (int i = 0; i < FREED_BLOCKS; i += 2) free(blocks[i]);
    for (int i = 1; i < FREED_BLOCKS; i += 2) free(blocks[i]);
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "child-free")) return child_that_frees();
    if (argc > 1 && !strcmp(argv[1], "child")) {
        char *mine = malloc(256 << 10);
        memset(mine, 5, 256 << 10);
        /* The block escapes: the compiler may not elide the allocation. */
        __asm__ volatile("" : : "r"(mine) : "memory");
        return mine[777] == 5 ? 0 : 3;
    }
    int n = argc > 1 ? atoi(argv[1]) : 0;
    const char *mode = argc > 2 && !strcmp(argv[2], "free") ? "child-free" : "child";
    for (int i = 0; i < n; i++) {
        pid_t child = fork();
        if (child == 0) {
            execl("/proc/self/exe", argv[0], mode, (char *)NULL);
            _exit(127);
        }
        int status = 0;
        if (child < 0 || waitpid(child, &status, 0) < 0 || !WIFEXITED(status) ||
            WEXITSTATUS(status) != 0) {
            fprintf(stderr, "child %d failed\n", i);
            return 1;
        }
    }
    char *block = malloc(1 << 20);
    memset(block, 3, 1 << 20);
    __asm__ volatile("" : : "r"(block) : "memory");
    printf("spawned %d\n", n);
    return block[12345] == 3 ? 0 : 2;
}
