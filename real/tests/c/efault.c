/* read(2) into heap pages another node took: the kernel would fail with EFAULT; the
 * runtime must take the pages back and retry.   efault owner | efault thief */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/uio.h>

#define BYTES (3 * 4096)

static volatile uintptr_t *root;

static int wait_for(int slot, uintptr_t value) {
    for (int i = 0; i < 30000; i++) {
        if (root[slot] == value) return 0;
        usleep(1000);
    }
    return -1;
}

int main(int argc, char **argv) {
    void *(*root_fn)(void) = (void *(*)(void))dlsym(RTLD_DEFAULT, "gallocy_root");
    if (!root_fn || argc != 2) return 2;
    root = root_fn();
    if (!strcmp(argv[1], "owner")) {
        char *buffer = aligned_alloc(4096, BYTES);
        memset(buffer, 'o', BYTES);
        root[3] = (uintptr_t)buffer;
        if (wait_for(4, 1)) return 3;
        /* The thief wrote every page: this process has no access to them now. */
        int fd = open("/proc/self/cmdline", O_RDONLY);
        ssize_t n = read(fd, buffer + 4096 + 100, 4000);
        close(fd);
        /* And readv into the third page, also taken. */
        fd = open("/proc/self/cmdline", O_RDONLY);
        struct iovec iov = { buffer + 2 * 4096 + 8, 100 };
        ssize_t v = readv(fd, &iov, 1);
        close(fd);
        if (v <= 0) { perror("readv"); return 8; }
        root[5] = 1;
        if (n <= 0) { perror("read"); return 4; }
        if (buffer[0] != 't') { fprintf(stderr, "did not see the thief's write\n"); return 5; }
        printf("read %zd bytes into pages another node had taken\n", n);
        return 0;
    }
    for (int i = 0; i < 30000 && root[3] == 0; i++) usleep(1000);
    char *buffer = (char *)root[3];
    if (!buffer) return 6;
    memset(buffer, 't', BYTES);
    root[4] = 1;
    return wait_for(5, 1) ? 7 : 0;
}
