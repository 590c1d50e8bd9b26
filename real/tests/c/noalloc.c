/* The runtime path never calls the system allocator: count allocator calls made by
 * allocation calls, faults (reads and writes of remote and local pages), pings and
 * stats, after attach. */
#include <stdio.h>
#include <string.h>
#include "gallocy.h"

unsigned long countalloc_calls(void);

int main(void) {
    if (gallocy_attach("noalloc") != 0) { fprintf(stderr, "attach: %s\n", gallocy_last_error()); return 1; }
    unsigned long before = countalloc_calls();
    void *blocks[64];
    for (int round = 0; round < 20; round++) {
        for (int i = 0; i < 64; i++) {
            blocks[i] = gallocy_malloc(16 + i * 97);
            if (!blocks[i]) return 2;
            memset(blocks[i], i, 16 + i * 97);            /* write faults */
        }
        for (int i = 0; i < 64; i += 2) {
            blocks[i] = gallocy_realloc(blocks[i], 5000 + i);  /* copy: read faults */
            if (!blocks[i]) return 3;
        }
        void *z = gallocy_calloc(100, 40);
        if (!z) return 4;
        gallocy_free(z);
        for (int i = 0; i < 64; i++) gallocy_free(blocks[i]);
        if (gallocy_ping() != 0) return 5;
        struct gallocy_stats s;
        if (gallocy_stats(&s) != 0) return 6;
    }
    gallocy_free(NULL);
    unsigned long after = countalloc_calls();
    printf("system allocator calls on the runtime path: %lu\n", after - before);
    return after == before ? 0 : 7;
}
