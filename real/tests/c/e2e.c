/* Programs for the end-to-end tests, one per subcommand. Each prints what it saw and
 * exits 0 on success. Shared state goes through the root block:
 *   root[0]  the published block        root[1]  a progress flag
 *   root[2..2+N] blocks to be freed by another node
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>
#include "gallocy.h"

#define FREE_BLOCKS 16
#define PATTERN_BYTES 3000

static volatile uint64_t *root;

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int attach(const char *space) {
    int rc = gallocy_attach(space);
    if (rc != 0) {
        fprintf(stderr, "attach failed: %d (%s): %s\n", rc, gallocy_strerror(rc), gallocy_last_error());
        exit(10);
    }
    root = (volatile uint64_t *)gallocy_root();
    return 0;
}

static int wait_for(volatile uint64_t *word, uint64_t value, double seconds) {
    double deadline = now_s() + seconds;
    while (*word != value) {
        if (now_s() > deadline) return -1;
        usleep(1000);
    }
    return 0;
}

/* Node 1: allocate, fill, publish; wait for node 2's answer; publish blocks for node 2 to free. */
static int publish(void) {
    attach("e2e");
    unsigned char *block = gallocy_malloc(PATTERN_BYTES);
    if (!block) { fprintf(stderr, "malloc: %s\n", gallocy_last_error()); return 11; }
    for (int i = 0; i < PATTERN_BYTES; i++) block[i] = (unsigned char)(i * 7 + 1);
    for (int i = 0; i < FREE_BLOCKS; i++) {
        void *p = gallocy_malloc(64 + i * 100);
        if (!p) return 12;
        memset(p, 0xab, 64);
        root[2 + i] = (uint64_t)p;
    }
    root[0] = (uint64_t)block;
    printf("published %p\n", (void *)block);
    fflush(stdout);
    if (wait_for(&root[1], 2, 20)) { fprintf(stderr, "no answer from the consumer\n"); return 13; }
    for (int i = 0; i < PATTERN_BYTES; i++) {
        if (block[i] != (unsigned char)(255 - (unsigned char)(i * 7 + 1))) {
            fprintf(stderr, "byte %d is %d, not the consumer's write\n", i, block[i]);
            return 14;
        }
    }
    printf("publisher saw the consumer's writes\n");
    /* The consumer freed our blocks: allocating again must be able to reuse them. */
    gallocy_free(block);
    return 0;
}

/* Node 2: read the published block through the same address, write it, free node 1's blocks. */
static int consume(void) {
    attach("e2e");
    if (wait_for(&root[0], root[0] ? root[0] : 1, 0) != 0) {}
    double deadline = now_s() + 20;
    while (root[0] == 0) {
        if (now_s() > deadline) { fprintf(stderr, "nothing published\n"); return 20; }
        usleep(1000);
    }
    unsigned char *block = (unsigned char *)root[0];
    for (int i = 0; i < PATTERN_BYTES; i++) {
        if (block[i] != (unsigned char)(i * 7 + 1)) {
            fprintf(stderr, "byte %d is %d, expected %d\n", i, block[i], (unsigned char)(i * 7 + 1));
            return 21;
        }
    }
    printf("consumer read the pattern at %p\n", (void *)block);
    for (int i = 0; i < PATTERN_BYTES; i++) block[i] = 255 - block[i];
    for (int i = 0; i < FREE_BLOCKS; i++) {
        gallocy_free((void *)root[2 + i]);
        root[2 + i] = 0;
    }
    /* A second free of the same block is refused (and reported), never a corruption. */
    root[1] = 2;
    struct gallocy_stats s;
    if (gallocy_stats(&s) == 0)
        printf("consumer on node %u: %lu remote faults\n", s.node_id, (unsigned long)s.faults_remote);
    return 0;
}

/* Alternate increments of a shared counter with another node; extra threads are busy
 * or blocked meanwhile, so revocations must reach a process that is not idle. */
struct pingpong { volatile uint64_t *counter; volatile int stop; };

static void *spinner(void *arg) {
    struct pingpong *pp = arg;
    uint64_t sum = 0;
    while (!pp->stop) sum += pp->counter[1]; /* reads the same page */
    return (void *)(uintptr_t)sum;
}

static void *blocker(void *arg) {
    int *fds = arg;
    char c;
    ssize_t n = read(fds[0], &c, 1); /* blocked in a system call until the end */
    (void)n;
    return NULL;
}

static int pingpong(int parity, long rounds) {
    attach("pingpong");
    volatile uint64_t *counter;
    if (parity == 0) {
        counter = gallocy_calloc(2, sizeof(uint64_t));
        if (!counter) return 30;
        root[0] = (uint64_t)counter;
    } else {
        double deadline = now_s() + 20;
        while (root[0] == 0) {
            if (now_s() > deadline) return 31;
            usleep(1000);
        }
        counter = (volatile uint64_t *)root[0];
    }
    struct pingpong pp = { counter, 0 };
    int fds[2];
    if (pipe(fds)) return 32;
    pthread_t spin, block;
    pthread_create(&spin, NULL, spinner, &pp);
    pthread_create(&block, NULL, blocker, fds);
    double start = now_s();
    double deadline = start + 60;
    for (long i = 0; i < rounds; i++) {
        uint64_t want = 2 * i + parity;
        while (*counter != want) {
            if (now_s() > deadline) { fprintf(stderr, "stuck at %lu waiting for %lu\n", (unsigned long)*counter, (unsigned long)want); return 33; }
        }
        *counter = want + 1;
    }
    double elapsed = now_s() - start;
    pp.stop = 1;
    if (write(fds[1], "x", 1) != 1) return 34;
    pthread_join(spin, NULL);
    pthread_join(block, NULL);
    printf("pingpong parity %d: %ld rounds in %.3f s, %.0f page transfers/s\n", parity, rounds, elapsed,
           2.0 * rounds / elapsed);
    return 0;
}

/* A clear error when the space range clashes with an existing mapping. */
static int clash(void) {
    void *taken = mmap((void *)0x200000000000ULL, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (taken == MAP_FAILED) { perror("mmap"); return 40; }
    int rc = gallocy_attach("clash");
    printf("attach: %d (%s): %s\n", rc, gallocy_strerror(rc), gallocy_last_error());
    return rc == -EEXIST ? 0 : 41;
}

/* Creates (or joins) `space`, leaves `value` in the root block and `mib` MiB of
 * written heap behind, and exits without detaching. */
static int leave(const char *space, uint64_t value, int mib) {
    attach(space);
    for (int i = 0; i < mib; i++) {
        unsigned char *block = gallocy_malloc(1 << 20);
        if (!block) { fprintf(stderr, "malloc: %s\n", gallocy_last_error()); return 11; }
        memset(block, 0x5a, 1 << 20);
    }
    root[0] = value;
    printf("left %llu\n", (unsigned long long)value);
    return 0;
}

static int wait_for_nonzero(volatile uint64_t *word, double seconds) {
    double deadline = now_s() + seconds;
    while (*word == 0) {
        if (now_s() > deadline) return -1;
        usleep(1000);
    }
    return 0;
}

/* Allocates `mib` blocks of 1 MiB and writes them, then frees them, each step
 * after a line on stdin, so the test can look at the cluster in between. */
static int churn(int mib) {
    attach("e2e-churn");
    static unsigned char *blocks[1024];
    char line[16];
    if (mib > 1024) return 2;
    for (int i = 0; i < mib; i++) {
        blocks[i] = gallocy_malloc(1 << 20);
        if (!blocks[i]) { fprintf(stderr, "malloc: %s\n", gallocy_last_error()); return 11; }
        memset(blocks[i], i + 1, 1 << 20);
    }
    printf("allocated\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 12;
    for (int i = 0; i < mib; i++) gallocy_free(blocks[i]);
    printf("freed\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 13;
    /* Another node leased the chunks again and published a block it never wrote past
     * its header: this node's memory of it must read as zeroes. */
    if (wait_for_nonzero(&root[1], 20)) return 14;
    unsigned char *again = (unsigned char *)root[1];
    for (int i = 4096; i < (8 << 20); i += 512) {
        if (again[i] != 0) {
            fprintf(stderr, "reused block holds %d at %d\n", again[i], i);
            return 15;
        }
    }
    root[2] = 1;
    printf("reused zeroed\n");
    return 0;
}

/* Allocates a block of `mib` MiB (fresh chunks on this node), publishes it in root[1]
 * without writing it, and waits for root[2]. */
static int lend(int mib) {
    attach("e2e-churn");
    unsigned char *block = gallocy_malloc((size_t)mib << 20);
    if (!block) { fprintf(stderr, "malloc: %s\n", gallocy_last_error()); return 11; }
    root[1] = (uint64_t)block;
    if (wait_for(&root[2], 1, 20)) return 12;
    return 0;
}

/* Joins an existing `space` and prints what its root block holds. */
static int find(const char *space) {
    int rc = gallocy_attach_existing(space);
    if (rc != 0) {
        printf("attach: %d (%s): %s\n", rc, gallocy_strerror(rc), gallocy_last_error());
        return 0;
    }
    root = (volatile uint64_t *)gallocy_root();
    printf("found %llu\n", (unsigned long long)root[0]);
    return 0;
}

/* Errors: no daemon, unknown space. */
static int expect_error(const char *space, int expected) {
    int rc = gallocy_attach_existing(space);
    printf("attach: %d (%s): %s\n", rc, gallocy_strerror(rc), gallocy_last_error());
    return rc == expected ? 0 : 50;
}

/* Attached, then the daemon dies: the next call must end the process with status 86. */
static int orphan(void) {
    attach("orphan");
    printf("attached\n");
    fflush(stdout);
    for (;;) {
        if (gallocy_ping() != 0) return 60;
        usleep(5000);
    }
}

/* Allocate on this node and publish, for a reader on another node (after a daemon was killed). */
static int survive_writer(void) {
    attach("survive");
    char *block = gallocy_malloc(64);
    if (!block) { fprintf(stderr, "malloc: %s\n", gallocy_last_error()); return 70; }
    strcpy(block, "written after a daemon was killed");
    root[5] = (uint64_t)block;
    printf("published %p\n", (void *)block);
    fflush(stdout);
    return wait_for(&root[6], 1, 20) ? 71 : 0;
}

static int survive_reader(void) {
    attach("survive");
    double deadline = now_s() + 20;
    while (root[5] == 0) {
        if (now_s() > deadline) return 72;
        usleep(1000);
    }
    const char *block = (const char *)root[5];
    printf("read: %s\n", block);
    int ok = strcmp(block, "written after a daemon was killed") == 0;
    root[6] = 1;
    return ok ? 0 : 73;
}

/* The crash-tolerance scenario (docs/protocol.md "Recovery"): `crash-writer` creates
 * the space (so its root block is homed on this node), allocates 64 pages here, fills
 * page i with a pattern of i, publishes them and stays attached until its daemon dies;
 * `crash-reader` (another node) reads every page, says so and stays attached;
 * `crash-verify` (a third node, after the writer's daemon was killed) reads all 64. */
#define CRASH_PAGES 64
static uint64_t crash_word(uint64_t page, uint64_t word) {
    return (page << 32) ^ (word * 0x9E3779B97F4A7C15ull) ^ 0xC0FFEEull;
}

static int crash_check(const volatile uint64_t *pages) {
    for (uint64_t p = 0; p < CRASH_PAGES; p++)
        for (uint64_t w = 0; w < 4096 / 8; w++)
            if (pages[p * 512 + w] != crash_word(p, w)) {
                fprintf(stderr, "page %llu word %llu holds %#llx\n", (unsigned long long)p,
                        (unsigned long long)w, (unsigned long long)pages[p * 512 + w]);
                return 1;
            }
    return 0;
}

static int crash_writer(void) {
    attach("crashed");
    volatile uint64_t *pages = gallocy_malloc(CRASH_PAGES * 4096);
    if (!pages) { fprintf(stderr, "malloc: %s\n", gallocy_last_error()); return 70; }
    for (uint64_t p = 0; p < CRASH_PAGES; p++)
        for (uint64_t w = 0; w < 4096 / 8; w++) pages[p * 512 + w] = crash_word(p, w);
    root[0] = (uint64_t)pages;
    printf("written\n");
    fflush(stdout);
    for (;;) pause();
}

static int crash_reader(int stay) {
    attach("crashed");
    double deadline = now_s() + 60;
    while (root[0] == 0) {
        if (now_s() > deadline) return 72;
        usleep(1000);
    }
    if (crash_check((const volatile uint64_t *)root[0])) return 73;
    printf("read %d pages\n", CRASH_PAGES);
    fflush(stdout);
    if (!stay) return 0;
    for (;;) pause();
}

/* A real crash outside the space still crashes (SIGSEGV, default action). */
static int crash(void) {
    attach("crash");
    printf("attached\n");
    fflush(stdout);
    volatile int *nowhere = (volatile int *)16;
    return *nowhere;
}

/* Holds a page for writing, publishes it, then stops (SIGSTOP): it can no longer apply
 * revocations. */
static int stopper(void) {
    attach("stopper");
    volatile uint64_t *block = gallocy_malloc(64);
    if (!block) return 90;
    block[0] = 4242;
    root[0] = (uint64_t)block;
    printf("stopping\n");
    fflush(stdout);
    raise(SIGSTOP);
    return 0;
}

/* Reads the stopped process's page: the daemon must take it back (by killing it). */
static int taker(void) {
    attach("stopper");
    double deadline = now_s() + 20;
    while (root[0] == 0) {
        if (now_s() > deadline) return 91;
        usleep(1000);
    }
    volatile uint64_t *block = (volatile uint64_t *)root[0];
    printf("read %lu\n", (unsigned long)block[0]);
    return block[0] == 4242 ? 0 : 92;
}

/* Replication (docs/protocol.md "Replication"): `sync-writer` creates the space (so
 * its root block and pages are homed here), writes 64 pages no other node reads,
 * publishes them and calls gallocy_sync (or msync with `msync`); `sync-verify`, on
 * another node after the writer's daemon was killed, reads them all. */
static int sync_writer(int use_msync) {
    attach("synced");
    volatile uint64_t *pages = gallocy_malloc(CRASH_PAGES * 4096);
    if (!pages) { fprintf(stderr, "malloc: %s\n", gallocy_last_error()); return 70; }
    for (uint64_t p = 0; p < CRASH_PAGES; p++)
        for (uint64_t w = 0; w < 4096 / 8; w++) pages[p * 512 + w] = crash_word(p, w);
    root[0] = (uint64_t)pages;
    int rc;
    if (use_msync) {
        rc = msync((void *)((uintptr_t)pages & ~(uintptr_t)4095), CRASH_PAGES * 4096 + 4096, MS_SYNC);
        if (rc == 0) rc = msync((void *)root, 4096, MS_SYNC);
        if (rc != 0) rc = -errno;
    } else {
        rc = gallocy_sync();
    }
    if (rc != 0) { fprintf(stderr, "sync: %d (%s)\n", rc, gallocy_strerror(rc)); return 71; }
    printf("synced\n");
    fflush(stdout);
    for (;;) pause();
}

static int sync_verify(void) {
    attach("synced");
    if (root[0] == 0) { fprintf(stderr, "the root block lost its pointer\n"); return 72; }
    if (crash_check((const volatile uint64_t *)root[0])) return 73;
    printf("read %d pages\n", CRASH_PAGES);
    return 0;
}

/* Blocks of a node that went down: `orphan-writer` (node 2) allocates ORPHANS blocks
 * with gallocy_malloc, fills them, publishes them and syncs; `orphan-free` (node 1,
 * after node 2's daemon was killed) checks each, frees each (the allocator that carved
 * them is gone: their headers say they are live), frees one again (refused: printed on
 * stderr) and allocates new blocks. */
#define ORPHANS 16
static int orphan_writer(void) {
    attach("orphans");
    for (int i = 0; i < ORPHANS; i++) {
        unsigned char *block = gallocy_malloc(100 + i * 50);
        if (!block) { fprintf(stderr, "malloc: %s\n", gallocy_last_error()); return 60; }
        memset(block, 0x40 + i, 100 + i * 50);
        root[i] = (uint64_t)block;
    }
    int rc = gallocy_sync();
    if (rc != 0) { fprintf(stderr, "sync: %s\n", gallocy_strerror(rc)); return 61; }
    printf("written\n");
    fflush(stdout);
    for (;;) pause();
}

static int orphan_free(void) {
    attach("orphans");
    for (int i = 0; i < ORPHANS; i++) {
        unsigned char *block = (unsigned char *)root[i];
        if (!block) { fprintf(stderr, "block %d lost its pointer\n", i); return 62; }
        for (int j = 0; j < 100 + i * 50; j++)
            if (block[j] != 0x40 + i) { fprintf(stderr, "block %d byte %d lost\n", i, j); return 63; }
        gallocy_free(block);
    }
    /* A double free is refused (and said on stderr). */
    gallocy_free((void *)root[3]);
    for (int i = 0; i < ORPHANS; i++) {
        unsigned char *block = gallocy_malloc(200);
        if (!block) { fprintf(stderr, "malloc after: %s\n", gallocy_last_error()); return 64; }
        memset(block, 7, 200);
        if (block[199] != 7) return 65;
    }
    printf("freed %d\n", ORPHANS);
    return 0;
}

/* A history for "no observed write is lost": `history ID PROCS SECONDS` on several
 * nodes. Process 0 allocates HISTORY_PAGES pages and publishes them; each process owns
 * word ID of every page and writes ever larger values into it, and reads the others'
 * words, keeping the largest value it saw of each. At the end it prints `saw P J V`
 * for every word (its own last writes included) and exits 0. `history-verify PROCS`
 * prints `now P J V` for every word. The test kills a daemon at a random moment and
 * checks that every word is at least what any surviving process saw of it. */
#define HISTORY_PAGES 24
#define HISTORY_PROCS 8

static uint64_t xorshift_state = 88172645463325252ull;
static uint64_t next_random(void) {
    xorshift_state ^= xorshift_state << 13;
    xorshift_state ^= xorshift_state >> 7;
    xorshift_state ^= xorshift_state << 17;
    return xorshift_state;
}

static int history(int id, int procs, double seconds) {
    if (procs > HISTORY_PROCS || id >= procs) return 2;
    attach("history");
    if (id == 0) {
        volatile uint64_t *pages = gallocy_malloc(HISTORY_PAGES * 4096);
        if (!pages) { fprintf(stderr, "malloc: %s\n", gallocy_last_error()); return 80; }
        root[0] = (uint64_t)pages;
    }
    if (wait_for_nonzero(&root[0], 30)) return 81;
    volatile uint64_t *pages = (volatile uint64_t *)root[0];
    static uint64_t seen[HISTORY_PROCS][HISTORY_PAGES];
    xorshift_state ^= (uint64_t)(id + 1) * 0x9E3779B97F4A7C15ull;
    printf("started\n");
    fflush(stdout);
    double deadline = now_s() + seconds;
    uint64_t counter = 0;
    while (now_s() < deadline) {
        uint64_t r = next_random();
        int page = (int)(r % HISTORY_PAGES);
        if ((r >> 32) % 2 == 0) {
            uint64_t value = ++counter;
            pages[page * 512 + id] = value;
            seen[id][page] = value;
        } else {
            int owner = (int)((r >> 40) % procs);
            uint64_t value = pages[page * 512 + owner];
            if (value > seen[owner][page]) seen[owner][page] = value;
        }
        if (counter % 64 == 0) usleep(200);
    }
    for (int p = 0; p < procs; p++)
        for (int j = 0; j < HISTORY_PAGES; j++)
            if (seen[p][j]) printf("saw %d %d %llu\n", p, j, (unsigned long long)seen[p][j]);
    printf("done\n");
    return 0;
}

static int history_verify(int procs) {
    attach("history");
    if (root[0] == 0) { fprintf(stderr, "the root block lost its pointer\n"); return 82; }
    volatile uint64_t *pages = (volatile uint64_t *)root[0];
    for (int p = 0; p < procs; p++)
        for (int j = 0; j < HISTORY_PAGES; j++)
            printf("now %d %d %llu\n", p, j, (unsigned long long)pages[j * 512 + p]);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    if (!strcmp(argv[1], "stopper")) return stopper();
    if (!strcmp(argv[1], "taker")) return taker();
    if (!strcmp(argv[1], "crash")) return crash();
    if (!strcmp(argv[1], "publish")) return publish();
    if (!strcmp(argv[1], "consume")) return consume();
    if (!strcmp(argv[1], "pingpong")) return pingpong(atoi(argv[2]), atol(argv[3]));
    if (!strcmp(argv[1], "clash")) return clash();
    if (!strcmp(argv[1], "expect-error")) return expect_error(argv[2], atoi(argv[3]));
    if (!strcmp(argv[1], "orphan")) return orphan();
    if (!strcmp(argv[1], "leave")) return leave(argv[2], strtoull(argv[3], 0, 10), atoi(argv[4]));
    if (!strcmp(argv[1], "find")) return find(argv[2]);
    if (!strcmp(argv[1], "churn")) return churn(atoi(argv[2]));
    if (!strcmp(argv[1], "lend")) return lend(atoi(argv[2]));
    if (!strcmp(argv[1], "crash-writer")) return crash_writer();
    if (!strcmp(argv[1], "crash-reader")) return crash_reader(1);
    if (!strcmp(argv[1], "crash-verify")) return crash_reader(0);
    if (!strcmp(argv[1], "survive-writer")) return survive_writer();
    if (!strcmp(argv[1], "survive-reader")) return survive_reader();
    if (!strcmp(argv[1], "orphan-writer")) return orphan_writer();
    if (!strcmp(argv[1], "orphan-free")) return orphan_free();
    if (!strcmp(argv[1], "sync-writer")) return sync_writer(argc > 2 && !strcmp(argv[2], "msync"));
    if (!strcmp(argv[1], "sync-verify")) return sync_verify();
    if (!strcmp(argv[1], "history")) return history(atoi(argv[2]), atoi(argv[3]), atof(argv[4]));
    if (!strcmp(argv[1], "history-verify")) return history_verify(atoi(argv[2]));
    return 2;
}
