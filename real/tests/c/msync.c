/* An unmodified-style program: its heap is the space (LD_PRELOAD), and msync(2) on it
 * makes its writes durable (on k nodes), the way a program syncs a mapped file.
 *   msync write   (node 2: fills 64 pages, msyncs them, then waits to be killed)
 *   msync read    (node 1, after node 2's daemon died: checks the 64 pages) */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGES 64

static uint64_t word(uint64_t page, uint64_t w) {
    return (page << 32) ^ (w * 0x9E3779B97F4A7C15ull) ^ 0x5EEDull;
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    void *(*root_fn)(void) = (void *(*)(void))dlsym(RTLD_DEFAULT, "gallocy_root");
    if (!root_fn) { fprintf(stderr, "not running under gallocy\n"); return 3; }
    volatile uintptr_t *root = root_fn();
    if (!strcmp(argv[1], "write")) {
        uint64_t *pages = NULL;
        if (posix_memalign((void **)&pages, 4096, PAGES * 4096)) return 4;
        for (uint64_t p = 0; p < PAGES; p++)
            for (uint64_t w = 0; w < 512; w++) pages[p * 512 + w] = word(p, w);
        root[0] = (uintptr_t)pages;
        if (msync(pages, PAGES * 4096, MS_SYNC) != 0) { perror("msync"); return 5; }
        if (msync((void *)root, 4096, MS_SYNC) != 0) { perror("msync root"); return 6; }
        printf("synced\n");
        fflush(stdout);
        for (;;) pause();
    }
    const uint64_t *pages = (const uint64_t *)root[0];
    if (!pages) { fprintf(stderr, "the root block lost its pointer\n"); return 7; }
    for (uint64_t p = 0; p < PAGES; p++)
        for (uint64_t w = 0; w < 512; w++)
            if (pages[p * 512 + w] != word(p, w)) {
                fprintf(stderr, "page %llu word %llu lost\n", (unsigned long long)p,
                        (unsigned long long)w);
                return 8;
            }
    printf("read %d pages\n", PAGES);
    return 0;
}
