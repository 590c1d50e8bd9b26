/* An instance that loads a library the others do not: a worker instance dlopens
 * libm in a constructor, so its modules differ from the main instance's and gallocy
 * must refuse to run the program, naming the library. */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

__attribute__((constructor)) static void differ(void) {
    const char *instance = getenv("GALLOCY_INSTANCE");
    if (instance && strcmp(instance, "worker") == 0)
        dlopen("libm.so.6", RTLD_NOW);
}

static void *work(void *arg) { return arg; }

int main(void) {
    pthread_t thread;
    if (pthread_create(&thread, NULL, work, NULL) == 0)
        pthread_join(thread, NULL);
    puts("ran");
    return 0;
}
