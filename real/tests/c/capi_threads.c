/* The explicit API under gallocy run -n 3: gallocy_attach, then a thread placed on each
 * node with gallocy_pthread_create_on, joined with gallocy_pthread_join. */
#include <gallocy.h>
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
static int where[3];
static void *work(void *arg) { where[*(int *)arg] = getpid(); return (void *)(long)(*(int *)arg * 7); }
int main(void) {
    int rc = gallocy_attach("run");
    if (rc != 0) {
        fprintf(stderr, "gallocy_attach: %s\n", gallocy_strerror(rc));
        return 3;
    }
    pthread_t t[3]; int ids[3] = {0, 1, 2};
    for (int i = 0; i < 3; i++) {
        int e = gallocy_pthread_create_on(&t[i], NULL, work, &ids[i], (uint32_t)(i + 1));
        if (e) { fprintf(stderr, "create_on %d: %d\n", i + 1, e); return 2; }
    }
    long sum = 0;
    for (int i = 0; i < 3; i++) { void *r; gallocy_pthread_join(t[i], &r); sum += (long)r; }
    printf("sum %ld, distinct %d\n", sum, (where[0] != where[1]) + (where[1] != where[2]) + (where[0] != where[2]));
    return 0;
}
