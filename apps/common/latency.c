#include "latency.h"

#include <string.h>

/* Below 128 every microsecond has its bucket; above, each power of two
 * [2^e, 2^(e+1)) is split into 64 equal buckets. */
#define LINEAR 128
#define SUB_BITS 6

static unsigned bucket_of(uint64_t v)
{
    unsigned e, shift, idx;

    if (v < LINEAR)
        return (unsigned)v;
    e = 63u - (unsigned)__builtin_clzll(v);
    shift = e - SUB_BITS;
    idx = (1u << SUB_BITS) * (e - SUB_BITS) + (unsigned)(v >> shift);
    return idx < LATENCY_BUCKETS ? idx : LATENCY_BUCKETS - 1;
}

/* The largest value that falls into bucket idx. */
static uint64_t bucket_upper(unsigned idx)
{
    unsigned e, shift;
    uint64_t sub;

    if (idx < LINEAR)
        return idx;
    e = idx / (1u << SUB_BITS) + SUB_BITS - 1;
    shift = e - SUB_BITS;
    sub = idx - (1u << SUB_BITS) * (e - SUB_BITS);
    return ((sub + 1) << shift) - 1;
}

void latency_init(struct latency *h)
{
    memset(h, 0, sizeof *h);
    h->min_us = UINT64_MAX;
}

void latency_record(struct latency *h, uint64_t us)
{
    h->bucket[bucket_of(us)]++;
    h->count++;
    h->sum_us += us;
    if (us > h->max_us)
        h->max_us = us;
    if (us < h->min_us)
        h->min_us = us;
}

void latency_merge(struct latency *dst, const struct latency *src)
{
    for (unsigned i = 0; i < LATENCY_BUCKETS; i++)
        dst->bucket[i] += src->bucket[i];
    dst->count += src->count;
    dst->sum_us += src->sum_us;
    if (src->max_us > dst->max_us)
        dst->max_us = src->max_us;
    if (src->min_us < dst->min_us)
        dst->min_us = src->min_us;
}

uint64_t latency_percentile(const struct latency *h, double q)
{
    uint64_t want, seen = 0;

    if (h->count == 0)
        return 0;
    if (q <= 0)
        return h->min_us;
    want = (uint64_t)(q * (double)h->count + 0.5);
    if (want < 1)
        want = 1;
    for (unsigned i = 0; i < LATENCY_BUCKETS; i++) {
        seen += h->bucket[i];
        if (seen >= want) {
            uint64_t v = bucket_upper(i);
            return v < h->max_us ? v : h->max_us;
        }
    }
    return h->max_us;
}

double latency_mean(const struct latency *h)
{
    return h->count ? (double)h->sum_us / (double)h->count : 0;
}

void latency_write(const struct latency *h, FILE *f)
{
    uint64_t seen = 0;

    for (unsigned i = 0; i < LATENCY_BUCKETS; i++) {
        if (!h->bucket[i])
            continue;
        seen += h->bucket[i];
        fprintf(f, "%llu %llu %.6f\n", (unsigned long long)bucket_upper(i),
                (unsigned long long)h->bucket[i],
                (double)seen / (double)h->count);
    }
}
