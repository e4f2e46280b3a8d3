/*
 * A latency histogram of fixed size (about 18 KiB): log-linear buckets,
 * 64 per power of two, so any recorded value is reported within 1.6% and
 * memory does not grow with the number of samples. Values are microseconds.
 */
#ifndef MQRPC_LATENCY_H
#define MQRPC_LATENCY_H

#include <stdint.h>
#include <stdio.h>

#define LATENCY_BUCKETS 2304

struct latency {
    uint64_t count;
    uint64_t sum_us;
    uint64_t max_us;
    uint64_t min_us;
    uint64_t bucket[LATENCY_BUCKETS];
};

/* latency_init empties h. */
void latency_init(struct latency *h);

/* latency_record adds one sample. */
void latency_record(struct latency *h, uint64_t us);

/* latency_merge adds every sample of src to dst. */
void latency_merge(struct latency *dst, const struct latency *src);

/* latency_percentile returns the value at or below which a fraction q
 * (0..1) of the samples lie: the upper bound of its bucket, capped at the
 * true maximum. 0 when empty. */
uint64_t latency_percentile(const struct latency *h, double q);

/* latency_mean in microseconds; 0 when empty. */
double latency_mean(const struct latency *h);

/* latency_write writes one line per non-empty bucket, "upper_us count
 * cumulative_fraction", for plotting (gnuplot reads it as is). */
void latency_write(const struct latency *h, FILE *f);

#endif
