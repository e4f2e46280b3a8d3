/* Small helpers shared by the library's files. */
#include "internal.h"

#include <string.h>
#include <time.h>

mqr_str mqr_cstr(const char *s)
{
    mqr_str r = {s, s ? strlen(s) : 0};
    return r;
}

bool mqr_str_eq(mqr_str s, const char *lit)
{
    size_t n = strlen(lit);
    return s.len == n && (n == 0 || memcmp(s.ptr, lit, n) == 0);
}

int64_t mqr_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int64_t mqr_wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int mqr_jitter(uint64_t *rng, int d)
{
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    return d / 2 + (int)(*rng % (uint64_t)(d / 2 + 1));
}

int mqr_backoff_next(int d, int max)
{
    return d > max / 2 ? max : d * 2;
}
