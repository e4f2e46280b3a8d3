/*
 * The growable ABI: options and stats structs carry or take their size, so
 * a program built against an older (smaller) or newer (larger) header
 * still works with this library; versions; the log callback. No broker.
 */
#include "mqrpc/mqrpc.h"

#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

/* The options of a program built against the 0.1-era layout: the same
 * fields up to reconnect_max_ms, nothing after. */
#define OLD_CLIENT_SIZE offsetof(mqrpc_client_opts, url_file)
#define OLD_SERVICE_SIZE offsetof(mqrpc_service_opts, url_file)

static json_t *echo(json_t *request, mqrpc_fault *fault, void *arg)
{
    (void)fault;
    (void)arg;
    return json_incref(request);
}

static void versions_agree(void **state)
{
    char buf[32];
    (void)state;
    assert_int_equal(mqrpc_version(), MQRPC_VERSION_NUMBER);
    assert_string_equal(mqrpc_version_string(), MQRPC_VERSION);
    snprintf(buf, sizeof buf, "%d.%d.%d", MQRPC_VERSION_MAJOR,
             MQRPC_VERSION_MINOR, MQRPC_VERSION_PATCH);
    assert_string_equal(buf, MQRPC_VERSION);
}

static void opts_init_sets_size_and_zeroes(void **state)
{
    mqrpc_client_opts co;
    mqrpc_service_opts so;
    (void)state;
    memset(&co, 0xff, sizeof co);
    memset(&so, 0xff, sizeof so);
    mqrpc_client_opts_init(&co);
    mqrpc_service_opts_init(&so);
    assert_int_equal(co.size, sizeof co);
    assert_int_equal(so.size, sizeof so);
    assert_null(co.url);
    assert_null(co.log);
    assert_int_equal(so.prefetch, 0);
}

/* An older program's struct is smaller: the library must not read past
 * it. The bytes after it are poisoned here, so reading them would set
 * fields the program never had. */
static void older_smaller_opts_are_accepted(void **state)
{
    unsigned char mem[sizeof(mqrpc_client_opts) + 64];
    unsigned char smem[sizeof(mqrpc_service_opts) + 64];
    mqrpc_client_opts *co = (mqrpc_client_opts *)mem;
    mqrpc_service_opts *so = (mqrpc_service_opts *)smem;
    mqrpc_client *c;
    mqrpc_service *s;
    (void)state;

    memset(mem, 0xff, sizeof mem);
    memset(mem, 0, OLD_CLIENT_SIZE);
    co->size = OLD_CLIENT_SIZE;
    co->heartbeat_s = 5;
    c = mqrpc_client_new(co);
    assert_non_null(c);
    mqrpc_client_free(c);

    memset(smem, 0xff, sizeof smem);
    memset(smem, 0, OLD_SERVICE_SIZE);
    so->size = OLD_SERVICE_SIZE;
    so->queue = "service_abi";
    s = mqrpc_service_new(so, echo, NULL);
    assert_non_null(s);
    assert_string_equal(mqrpc_service_errmsg(s), "not connected");
    mqrpc_service_free(s);
}

/* A newer program's struct is larger: zero extra fields mean "default"
 * and are fine; a set one asks for what this library lacks. */
static void newer_larger_opts(void **state)
{
    struct {
        mqrpc_client_opts o;
        unsigned char newer[16];
    } big;
    mqrpc_client *c;
    (void)state;

    memset(&big, 0, sizeof big);
    big.o.size = sizeof big;
    c = mqrpc_client_new(&big.o);
    assert_non_null(c);
    mqrpc_client_free(c);

    big.newer[3] = 1;
    errno = 0;
    assert_null(mqrpc_client_new(&big.o));
    assert_int_equal(errno, EINVAL);
}

static void opts_without_size_are_refused(void **state)
{
    mqrpc_client_opts co;
    mqrpc_service_opts so;
    (void)state;
    memset(&co, 0, sizeof co);
    errno = 0;
    assert_null(mqrpc_client_new(&co));
    assert_int_equal(errno, EINVAL);
    memset(&so, 0, sizeof so);
    so.queue = "service_abi";
    errno = 0;
    assert_null(mqrpc_service_new(&so, echo, NULL));
    assert_int_equal(errno, EINVAL);
}

/* Stats: a caller with a smaller struct gets its prefix, and nothing is
 * written past it. */
static void stats_fill_only_the_callers_size(void **state)
{
    unsigned char mem[sizeof(mqrpc_client_stats) + 16];
    size_t old = offsetof(mqrpc_client_stats, blocked);
    mqrpc_client *c = mqrpc_client_new(NULL);
    (void)state;

    assert_non_null(c);
    memset(mem, 0xab, sizeof mem);
    mqrpc_client_get_stats(c, (mqrpc_client_stats *)mem, old);
    for (size_t i = old; i < sizeof mem; i++)
        assert_int_equal(mem[i], 0xab);
    assert_int_equal(((mqrpc_client_stats *)mem)->dropped, 0);
    mqrpc_client_free(c);
}

struct log_seen {
    int calls;
    mqrpc_log_level level;
    char line[256];
};

static void record_log(mqrpc_log_level level, const char *line, void *arg)
{
    struct log_seen *seen = arg;
    seen->calls++;
    seen->level = level;
    snprintf(seen->line, sizeof seen->line, "%s", line);
}

/* The log callback gets the service's lines instead of stderr: here the
 * first connection attempt to a port nobody listens on. */
static void log_callback_receives_lines(void **state)
{
    mqrpc_service_opts so;
    mqrpc_service *s;
    struct log_seen seen = {0};
    (void)state;

    mqrpc_service_opts_init(&so);
    so.queue = "service_abi";
    so.url = "amqp://u:p@127.0.0.1:1/";
    so.log = record_log;
    so.log_arg = &seen;
    so.connect_retry_ms = 300;
    so.reconnect_min_ms = 50;
    s = mqrpc_service_new(&so, echo, NULL);
    assert_non_null(s);
    assert_int_equal(mqrpc_service_connect(s), MQRPC_ECONNECT);
    assert_int_equal(seen.calls, 1);
    assert_int_equal(seen.level, MQRPC_LOG_WARN);
    assert_non_null(strstr(seen.line, "connection refused"));
    assert_null(strchr(seen.line, '\n'));
    mqrpc_service_free(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(versions_agree),
        cmocka_unit_test(opts_init_sets_size_and_zeroes),
        cmocka_unit_test(older_smaller_opts_are_accepted),
        cmocka_unit_test(newer_larger_opts),
        cmocka_unit_test(opts_without_size_are_refused),
        cmocka_unit_test(stats_fill_only_the_callers_size),
        cmocka_unit_test(log_callback_receives_lines),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
