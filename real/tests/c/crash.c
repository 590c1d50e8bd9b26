/* A thread on another node dies of a fatal signal: the program ends with that
 * signal's status and a message naming the node. */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>

static void *dies(void *arg) {
    raise(SIGABRT);
    return arg;
}

int main(void) {
    pthread_t thread;
    pthread_create(&thread, NULL, dies, NULL);
    pthread_join(thread, NULL);
    puts("unreachable");
    return 0;
}
