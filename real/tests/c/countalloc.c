/* Counts calls into the system allocator: linked ahead of libc, it interposes malloc
 * and friends for the whole process (libgallocy included) and forwards to glibc's
 * __libc_* entry points. */
#include <stddef.h>
#include <stdatomic.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void __libc_free(void *);
extern void *__libc_memalign(size_t, size_t);

static atomic_ulong calls;

unsigned long countalloc_calls(void) { return atomic_load(&calls); }

void *malloc(size_t n) { atomic_fetch_add(&calls, 1); return __libc_malloc(n); }
void *calloc(size_t n, size_t s) { atomic_fetch_add(&calls, 1); return __libc_calloc(n, s); }
void *realloc(void *p, size_t n) { atomic_fetch_add(&calls, 1); return __libc_realloc(p, n); }
void free(void *p) { if (p) atomic_fetch_add(&calls, 1); __libc_free(p); }
void *memalign(size_t a, size_t n) { atomic_fetch_add(&calls, 1); return __libc_memalign(a, n); }
void *aligned_alloc(size_t a, size_t n) { atomic_fetch_add(&calls, 1); return __libc_memalign(a, n); }
int posix_memalign(void **out, size_t a, size_t n) {
    atomic_fetch_add(&calls, 1);
    void *p = __libc_memalign(a, n);
    if (!p) return 12;
    *out = p;
    return 0;
}
