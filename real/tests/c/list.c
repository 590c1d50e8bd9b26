/* An unmodified-style program: plain malloc, a linked list. Only the head is published
 * through gallocy_root (looked up at run time: the program is not linked with gallocy).
 *   list build N   (node 1)   list walk N   (node 2) */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct node { struct node *next; long value; char label[40]; };

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    long n = atol(argv[2]);
    void *(*root_fn)(void) = (void *(*)(void))dlsym(RTLD_DEFAULT, "gallocy_root");
    if (!root_fn) { fprintf(stderr, "not running under gallocy\n"); return 3; }
    volatile uintptr_t *root = root_fn();
    if (!strcmp(argv[1], "build")) {
        struct node *head = NULL;
        for (long i = 0; i < n; i++) {
            struct node *x = malloc(sizeof *x);
            x->value = i * i;
            snprintf(x->label, sizeof x->label, "node %ld", i);
            x->next = head;
            head = x;
        }
        root[0] = (uintptr_t)head;
        root[1] = (uintptr_t)n;
        for (int i = 0; i < 30000 && root[2] != 1; i++) usleep(1000);
        if (root[2] != 1) { printf("walker timed out\n"); return 4; }
        /* The walker freed every node (frees of another node's blocks); allocate and
         * check a second list: reused blocks must hold what we write. */
        struct node *again = NULL;
        for (long i = 0; i < n; i++) {
            struct node *x = malloc(sizeof *x);
            x->value = -i;
            snprintf(x->label, sizeof x->label, "again %ld", i);
            x->next = again;
            again = x;
        }
        long count = 0;
        for (struct node *x = again; x; x = x->next, count++) {
            char want[40];
            snprintf(want, sizeof want, "again %ld", n - 1 - count);
            if (strcmp(x->label, want) || x->value != -(n - 1 - count)) { fprintf(stderr, "corrupted: %s\n", x->label); return 7; }
        }
        printf("built %ld nodes, walker done, rebuilt %ld\n", n, count);
        return 0;
    }
    for (int i = 0; i < 30000 && root[1] != (uintptr_t)n; i++) usleep(1000);
    long count = 0, sum = 0;
    for (struct node *x = (struct node *)root[0]; x; x = x->next) {
        char want[40];
        snprintf(want, sizeof want, "node %ld", (long)(n - 1 - count));
        if (strcmp(x->label, want)) { fprintf(stderr, "label %s, expected %s\n", x->label, want); return 5; }
        sum += x->value;
        count++;
    }
    /* Free every node: blocks another node allocated. */
    for (struct node *x = (struct node *)root[0]; x;) {
        struct node *next = x->next;
        free(x);
        x = next;
    }
    root[2] = 1;
    printf("walked %ld nodes, sum %ld\n", count, sum);
    return count == n ? 0 : 6;
}
