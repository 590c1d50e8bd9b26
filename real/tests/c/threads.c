/* 4 threads allocate and free concurrently; half of each thread's blocks are freed by
 * the next thread (cross-thread frees). Prints a deterministic summary. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define THREADS 4
#define ROUNDS 20000
#define QUEUE 1024

struct queue { pthread_mutex_t lock; void *items[QUEUE]; size_t sizes[QUEUE]; int count; };
static struct queue queues[THREADS];
static unsigned long checksums[THREADS];

static void *work(void *arg) {
    int me = (int)(intptr_t)arg;
    unsigned seed = 1234 + me;
    struct queue *next = &queues[(me + 1) % THREADS], *mine = &queues[me];
    unsigned long sum = 0;
    for (int i = 0; i < ROUNDS; i++) {
        size_t size = 1 + rand_r(&seed) % 2000;
        unsigned char *p = malloc(size);
        if (!p) { fprintf(stderr, "malloc failed\n"); exit(1); }
        memset(p, (unsigned char)(i + me), size);
        if (i % 2) {
            pthread_mutex_lock(&next->lock);
            if (next->count < QUEUE) { next->items[next->count] = p; next->sizes[next->count] = size; next->count++; p = NULL; }
            pthread_mutex_unlock(&next->lock);
        }
        if (p) {
            for (size_t k = 0; k < size; k++) sum += p[k];
            free(p);
        }
        pthread_mutex_lock(&mine->lock);
        while (mine->count > 0) {
            mine->count--;
            unsigned char *q = mine->items[mine->count];
            size_t n = mine->sizes[mine->count];
            for (size_t k = 1; k < n; k++) if (q[k] != q[0]) { fprintf(stderr, "corrupted block\n"); exit(2); }
            sum += q[0];
            free(q); /* allocated by another thread */
        }
        pthread_mutex_unlock(&mine->lock);
    }
    checksums[me] = sum;
    return NULL;
}

int main(void) {
    pthread_t threads[THREADS];
    for (int i = 0; i < THREADS; i++) pthread_mutex_init(&queues[i].lock, NULL);
    for (int i = 0; i < THREADS; i++) pthread_create(&threads[i], NULL, work, (void *)(intptr_t)i);
    for (int i = 0; i < THREADS; i++) pthread_join(threads[i], NULL);
    for (int i = 0; i < THREADS; i++) {
        while (queues[i].count > 0) free(queues[i].items[--queues[i].count]);
    }
    printf("threads done\n");
    return 0;
}
