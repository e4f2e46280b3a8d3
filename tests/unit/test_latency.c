/* rpc_bench's latency histogram: what it reports is what was recorded,
 * within its stated precision, and merging loses nothing. */
#include "latency.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <cmocka.h>

static struct latency *new_hist(void)
{
    struct latency *h = malloc(sizeof *h);
    assert_non_null(h);
    latency_init(h);
    return h;
}

static void empty_reports_zero(void **state)
{
    struct latency *h = new_hist();
    (void)state;
    assert_int_equal(latency_percentile(h, 0.5), 0);
    assert_true(latency_mean(h) == 0);
    free(h);
}

/* Any single value comes back within 1/64 above it (the bucket's upper
 * bound), never below, from 1 us to over an hour. */
static void every_value_within_precision(void **state)
{
    struct latency *h = new_hist();
    (void)state;
    for (uint64_t v = 1; v < (1ULL << 33); v += v / 7 + 1) {
        latency_record(h, v);
        latency_record(h, v + 1000000000000ULL); /* keep max above v */
        uint64_t p = latency_percentile(h, 0.5);
        assert_true(p >= v);
        assert_true(p - v <= v / 64);
        latency_init(h);
    }
    free(h);
}

static void percentiles_of_a_uniform_run(void **state)
{
    struct latency *h = new_hist();
    (void)state;
    for (uint64_t v = 1; v <= 10000; v++)
        latency_record(h, v);
    assert_int_equal(h->count, 10000);
    assert_int_equal(h->max_us, 10000);
    assert_int_equal(h->min_us, 1);
    uint64_t p50 = latency_percentile(h, 0.50);
    uint64_t p99 = latency_percentile(h, 0.99);
    assert_true(p50 >= 5000 && p50 <= 5000 + 5000 / 64);
    assert_true(p99 >= 9900 && p99 <= 9900 + 9900 / 64);
    assert_int_equal(latency_percentile(h, 1.0), 10000);
    assert_true(latency_mean(h) > 5000.4 && latency_mean(h) < 5000.6);
    free(h);
}

static void merge_is_the_union(void **state)
{
    struct latency *a = new_hist(), *b = new_hist(), *all = new_hist();
    (void)state;
    for (uint64_t v = 1; v <= 1000; v++) {
        latency_record(v % 2 ? a : b, v * 3);
        latency_record(all, v * 3);
    }
    latency_merge(a, b);
    assert_int_equal(a->count, all->count);
    assert_int_equal(a->sum_us, all->sum_us);
    assert_int_equal(a->max_us, all->max_us);
    assert_int_equal(a->min_us, all->min_us);
    for (double q = 0.1; q < 1.0; q += 0.1)
        assert_int_equal(latency_percentile(a, q), latency_percentile(all, q));
    free(a);
    free(b);
    free(all);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(empty_reports_zero),
        cmocka_unit_test(every_value_within_precision),
        cmocka_unit_test(percentiles_of_a_uniform_run),
        cmocka_unit_test(merge_is_the_union),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
