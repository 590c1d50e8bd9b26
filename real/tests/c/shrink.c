/* A program whose heap grows, then shrinks: 32 blocks of 4 MiB, written, then freed.
 * Each step waits for a line on stdin so the test can look at the cluster. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(void) {
    static char *blocks[32];
    char line[16];
    for (int i = 0; i < 32; i++) {
        blocks[i] = malloc(4 << 20);
        if (!blocks[i]) { perror("malloc"); return 1; }
        memset(blocks[i], i + 1, 4 << 20);
    }
    printf("grown\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 2;
    for (int i = 0; i < 32; i++) free(blocks[i]);
    printf("shrunk\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 3;
    /* Large blocks again: from the runs kept or freshly leased, usable either way. */
    for (int i = 0; i < 8; i++) {
        char *p = malloc(4 << 20);
        if (!p) { perror("malloc"); return 4; }
        memset(p, 0x5a, 4 << 20);
        free(p);
    }
    printf("done\n");
    return 0;
}
