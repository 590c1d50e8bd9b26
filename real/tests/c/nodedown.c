/* A program whose threads on other nodes wait forever (on a condition variable that
 * is never signalled): the test kills a node's daemon while they wait, and the
 * program must end with gallocy's node-down status, not hang. */
#include <pthread.h>
#include <stdio.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t never = PTHREAD_COND_INITIALIZER;
static int started;

static void *waiter(void *arg) {
    pthread_mutex_lock(&lock);
    started++;
    pthread_cond_broadcast(&never);
    for (;;)
        pthread_cond_wait(&never, &lock);
    return arg;
}

int main(void) {
    pthread_t threads[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&threads[i], NULL, waiter, NULL);
    pthread_mutex_lock(&lock);
    while (started < 2)
        pthread_cond_wait(&never, &lock);
    pthread_mutex_unlock(&lock);
    fprintf(stderr, "waiting\n");
    for (int i = 0; i < 2; i++)
        pthread_join(threads[i], NULL);
    return 0;
}
