/* A thread's output reaches the launcher's stdout and stderr: the first thread (placed
 * on another node by round robin) writes a line to each, then main writes its own. */
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

static int pids[2];

static void *work(void *arg) {
    pids[0] = getpid();
    printf("a line from a thread\n");
    fprintf(stderr, "an error line from a thread\n");
    return arg;
}

int main(void) {
    pthread_t thread;
    if (pthread_create(&thread, NULL, work, NULL) != 0)
        return 2;
    pthread_join(thread, NULL);
    pids[1] = getpid();
    printf("main done, thread in %s process\n", pids[0] == pids[1] ? "the same" : "another");
    return 0;
}
