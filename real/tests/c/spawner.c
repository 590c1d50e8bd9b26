/* Runs itself as a child N times (fork + exec, waiting for each; a child allocates and
 * touches 256 KiB and exits), then allocates and touches 1 MiB. Under `gallocy run`,
 * the children are exec'd descendants of the program. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "child")) {
        char *mine = malloc(256 << 10);
        memset(mine, 5, 256 << 10);
        /* The block escapes: the compiler may not elide the allocation. */
        __asm__ volatile("" : : "r"(mine) : "memory");
        return mine[777] == 5 ? 0 : 3;
    }
    int n = argc > 1 ? atoi(argv[1]) : 0;
    for (int i = 0; i < n; i++) {
        pid_t child = fork();
        if (child == 0) {
            execl("/proc/self/exe", argv[0], "child", (char *)NULL);
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
