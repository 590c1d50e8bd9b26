/* Two processes, two nodes, one heap.
 *
 *   GALLOCY_SOCKET=DIR/node1/app.sock ./share write    # allocates, writes, publishes
 *   GALLOCY_SOCKET=DIR/node2/app.sock ./share read     # reads it at the same address
 *
 * The pointer travels through the root block, which every process of the space sees
 * at the same address. */
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include "gallocy.h"

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s write|read\n", argv[0]); return 2; }
    if (gallocy_attach("example") != 0) {
        fprintf(stderr, "gallocy_attach: %s\n", gallocy_last_error());
        return 1;
    }
    char *volatile *root = (char *volatile *)gallocy_root();
    if (strcmp(argv[1], "write") == 0) {
        char *message = gallocy_malloc(64);
        snprintf(message, 64, "hello from process %d", (int)getpid());
        root[0] = message;
        printf("wrote \"%s\" at %p\n", message, (void *)message);
        /* Wait until the reader answers in the same block. */
        for (int i = 0; i < 3000 && strncmp(message, "thanks", 6) != 0; i++) usleep(10000);
        printf("now it says \"%s\"\n", message);
    } else {
        for (int i = 0; i < 3000 && root[0] == NULL; i++) usleep(10000);
        char *message = root[0];
        if (message == NULL) { fprintf(stderr, "nothing published\n"); return 1; }
        printf("read \"%s\" at %p\n", message, (void *)message);
        snprintf(message, 64, "thanks from process %d", (int)getpid());
    }
    struct gallocy_stats stats;
    if (gallocy_stats(&stats) == 0)
        printf("node %u: %lu local and %lu remote faults\n", stats.node_id,
               (unsigned long)stats.faults_local, (unsigned long)stats.faults_remote);
    gallocy_detach();
    return 0;
}
