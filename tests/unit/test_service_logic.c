/*
 * The service's pure decisions, without a broker: what happens to a
 * redelivered request (requeued with its count + 1, or dead-lettered).
 */
#include "internal.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

static void first_redelivery_is_requeued_with_count_1(void **state)
{
    uint32_t failed = 0;

    (void)state;
    assert_false(mqr_redelivery_decide(0, 3, &failed));
    assert_int_equal(failed, 1);
    assert_false(mqr_redelivery_decide(1, 3, &failed));
    assert_int_equal(failed, 2);
}

static void dead_lettered_when_the_count_reaches_max(void **state)
{
    uint32_t failed = 0;

    (void)state;
    assert_true(mqr_redelivery_decide(2, 3, &failed));
    assert_int_equal(failed, 3);
    /* a count already past max (max lowered since) */
    assert_true(mqr_redelivery_decide(10, 3, &failed));
    assert_int_equal(failed, 11);
}

static void max_1_dead_letters_the_first_redelivery(void **state)
{
    uint32_t failed = 0;

    (void)state;
    assert_true(mqr_redelivery_decide(0, 1, &failed));
    assert_int_equal(failed, 1);
    /* 0 is not "never": it counts as 1 */
    assert_true(mqr_redelivery_decide(0, 0, &failed));
}

static void the_count_saturates_instead_of_wrapping(void **state)
{
    uint32_t failed = 0;

    (void)state;
    assert_true(mqr_redelivery_decide(UINT32_MAX, UINT32_MAX, &failed));
    assert_int_equal(failed, UINT32_MAX);
    assert_true(mqr_redelivery_decide(UINT32_MAX - 1, UINT32_MAX, &failed));
    assert_int_equal(failed, UINT32_MAX);
    /* wrapping to 0 would have requeued it forever */
    assert_true(mqr_redelivery_decide(UINT32_MAX, 5, &failed));
    assert_int_equal(failed, UINT32_MAX);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(first_redelivery_is_requeued_with_count_1),
        cmocka_unit_test(dead_lettered_when_the_count_reaches_max),
        cmocka_unit_test(max_1_dead_letters_the_first_redelivery),
        cmocka_unit_test(the_count_saturates_instead_of_wrapping),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
