/* glibc's malloc semantics, checked under the preloaded allocator. Exit 0 or the
 * number of the failed check. */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <fcntl.h>
#include <dlfcn.h>

#define CHECK(n, cond) do { if (!(cond)) { fprintf(stderr, "check %d failed: %s\n", n, #cond); return n; } } while (0)

int main(void) {
    /* 16-byte alignment for every size. */
    for (size_t s = 1; s < 5000; s += 7) {
        void *p = malloc(s);
        CHECK(1, p && ((uintptr_t)p % 16) == 0);
        CHECK(2, malloc_usable_size(p) >= s);
        free(p);
    }
    /* Failure: NULL and ENOMEM. */
    errno = 0;
    CHECK(3, malloc(SIZE_MAX - 100) == NULL && errno == ENOMEM);
    errno = 0;
    CHECK(4, calloc(SIZE_MAX / 2, 4) == NULL && errno == ENOMEM);
    errno = 0;
    CHECK(5, reallocarray(NULL, SIZE_MAX / 2, 4) == NULL && errno == ENOMEM);
    /* realloc keeps the prefix, growing and shrinking; realloc(NULL) is malloc. */
    char *r = realloc(NULL, 10);
    CHECK(6, r != NULL);
    memcpy(r, "0123456789", 10);
    r = realloc(r, 100000);
    CHECK(7, r && memcmp(r, "0123456789", 10) == 0);
    r = realloc(r, 5);
    CHECK(8, r && memcmp(r, "01234", 5) == 0);
    free(r);
    /* posix_memalign: EINVAL for a bad alignment, alignment honoured otherwise. */
    void *a = NULL;
    CHECK(9, posix_memalign(&a, 3, 64) == EINVAL);
    CHECK(10, posix_memalign(&a, 4096, 100) == 0 && ((uintptr_t)a % 4096) == 0);
    free(a);
    CHECK(11, ((uintptr_t)aligned_alloc(256, 512) % 256) == 0);
    CHECK(12, ((uintptr_t)memalign(64, 10) % 64) == 0);
    CHECK(13, ((uintptr_t)valloc(10) % 4096) == 0);
    void *pv = pvalloc(10);
    CHECK(14, ((uintptr_t)pv % 4096) == 0 && malloc_usable_size(pv) >= 4096);
    /* free(NULL) is a no-op; free keeps errno. */
    free(NULL);
    void *e = malloc(10);
    errno = 1234;
    free(e);
    CHECK(15, errno == 1234);
    /* calloc memory is zero even when reused. */
    for (int round = 0; round < 50; round++) {
        unsigned char *d = malloc(3000);
        memset(d, 0xff, 3000);
        free(d);
        unsigned char *z = calloc(1, 3000);
        for (int i = 0; i < 3000; i++) CHECK(16, z[i] == 0);
        free(z);
    }
    /* Large blocks. */
    char *big = malloc(50 << 20);
    CHECK(17, big != NULL);
    memset(big, 7, 50 << 20);
    CHECK(18, big[(50 << 20) - 1] == 7);
    free(big);
    /* A forked child never writes its parent's pages, and can allocate. */
    char *mine = malloc(64);
    strcpy(mine, "parent's");
    pid_t pid = fork();
    if (pid == 0) {
        strcpy(mine, "child's!");
        char *more = malloc(100000);
        memset(more, 1, 100000);
        free(more);
        _exit(strcmp(mine, "child's!") == 0 ? 0 : 1);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK(19, WIFEXITED(status) && WEXITSTATUS(status) == 0);
    CHECK(20, strcmp(mine, "parent's") == 0);
    /* fork + exec, system(), popen(). */
    CHECK(21, system("exit 3") != -1);
    FILE *pipe = popen("echo piped", "r");
    char line[64] = {0};
    CHECK(22, pipe && fgets(line, sizeof line, pipe) && strcmp(line, "piped\n") == 0);
    CHECK(23, pclose(pipe) == 0);
    /* read(2) into fresh heap memory. */
    int fd = open("/proc/self/cmdline", O_RDONLY);
    char *buffer = malloc(1 << 20);
    CHECK(24, fd >= 0 && read(fd, buffer, 1 << 20) > 0);
    close(fd);
    /* The runtime path never re-entered the allocator (ld.so, libc start-up, attach,
     * faults, leases, fork, I/O wrappers all ran above). */
    unsigned long (*reentries)(void) = (unsigned long (*)(void))dlsym(RTLD_DEFAULT, "gallocy_preload_reentries");
    CHECK(25, reentries != NULL && reentries() == 0);
    printf("semantics ok\n");
    return 0;
}
