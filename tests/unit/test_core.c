/* Unit tests of the library's pure parts (no broker): the error table, the
 * message codec, broker URL handling, and the programs' option parsing. */
#include "cli.h"
#include "internal.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

/* ------------------------------------------------------------- errors */

static void every_error_has_a_name_and_a_sentence(void **state)
{
    (void)state;
    for (int e = 0; e < MQRPC_ERR_COUNT_; e++) {
        const char *name = mqrpc_errname((mqrpc_err)e);
        assert_non_null(name);
        assert_true(strlen(name) > 1);
        assert_true(strlen(mqrpc_strerror((mqrpc_err)e)) > 1);
        for (int f = 0; f < e; f++)
            assert_string_not_equal(name, mqrpc_errname((mqrpc_err)f));
    }
    assert_string_equal(mqrpc_errname(MQRPC_ETIMEOUT), "timeout");
    assert_string_equal(mqrpc_strerror((mqrpc_err)9999), "unknown error");
    assert_string_equal(mqrpc_errname((mqrpc_err)-1), "unknown");
}

static void fault_set_formats_and_returns_null(void **state)
{
    mqrpc_fault f;
    (void)state;
    assert_null(mqrpc_fault_set(&f, MQRPC_NOT_FOUND, "no person named \"%s\"",
                                "maria"));
    assert_string_equal(f.code, "not_found");
    assert_string_equal(f.message, "no person named \"maria\"");
}

/* -------------------------------------------------------------- codec */

static void decode_request_accepts_objects(void **state)
{
    mqrpc_fault f;
    json_t *v;
    const char *body = "{\"a\": 10, \"b\": 5}";
    (void)state;
    assert_int_equal(mqr_decode_request(body, strlen(body), 0, &v, &f),
                     MQRPC_OK);
    assert_int_equal(json_integer_value(json_object_get(v, "a")), 10);
    json_decref(v);
}

static void expect_bad_request(const char *body, size_t len, size_t max,
                               const char *fragment)
{
    mqrpc_fault f;
    json_t *v = (json_t *)1;
    assert_int_equal(mqr_decode_request(body, len, max, &v, &f), MQRPC_EINVAL);
    assert_null(v);
    assert_string_equal(f.code, "bad_request");
    if (!strstr(f.message, fragment))
        fail_msg("message \"%s\" lacks \"%s\"", f.message, fragment);
}

static void decode_request_rejects_bad_bodies(void **state)
{
    char *deep;
    (void)state;
    expect_bad_request("nope", 4, 0, "not valid JSON");
    expect_bad_request("", 0, 0, "not valid JSON");
    expect_bad_request("[1, 2]", 6, 0, "must be a JSON object, got array");
    expect_bad_request("15", 2, 0, "got integer");
    expect_bad_request("\"x\"", 3, 0, "got string");
    expect_bad_request("{\"a\": \"\xff\"}", 10, 0, "not valid JSON");
    expect_bad_request("{\"a\": 1}", 8, 4, "is 8 bytes, over the limit of 4");
    /* Deep nesting is refused by the parser's depth limit, not the stack. */
    deep = malloc(200001);
    memset(deep, '[', 100000);
    memset(deep + 100000, ']', 100000);
    deep[200000] = '\0';
    expect_bad_request(deep, 200000, 300000, "not valid JSON");
    free(deep);
}

static void encode_matches_what_the_seed_sends(void **state)
{
    size_t len;
    char *s;
    json_t *v;
    (void)state;
    v = json_real(25.0);
    s = mqr_encode_result(v, &len);
    assert_string_equal(s, "25.0");
    assert_int_equal(len, 4);
    free(s);
    json_decref(v);
    v = json_pack("{s:i,s:s}", "idade", 22, "cidade", "São Paulo");
    s = mqr_encode_result(v, &len);
    assert_string_equal(s, "{\"idade\": 22, \"cidade\": \"São Paulo\"}");
    free(s);
    json_decref(v);
}

static void faults_round_trip(void **state)
{
    mqrpc_fault in, out;
    json_t *res;
    size_t len;
    char *body;
    (void)state;
    mqrpc_fault_set(&in, MQRPC_BAD_REQUEST, "field \"b\" is missing");
    body = mqr_encode_fault(&in, &len);
    assert_string_equal(body, "{\"error\": {\"code\": \"bad_request\", "
                              "\"message\": \"field \\\"b\\\" is missing\"}}");
    assert_int_equal(mqr_decode_reply(true, body, len, &res, &out),
                     MQRPC_EREMOTE);
    assert_null(res);
    assert_string_equal(out.code, "bad_request");
    assert_string_equal(out.message, "field \"b\" is missing");
    free(body);
    /* A message that is not UTF-8 still yields a valid error reply. */
    snprintf(in.message, sizeof in.message, "bad \xff byte");
    body = mqr_encode_fault(&in, &len);
    assert_non_null(body);
    assert_int_equal(mqr_decode_reply(true, body, len, &res, &out),
                     MQRPC_EREMOTE);
    assert_string_equal(out.code, "internal");
    free(body);
}

static void decode_reply_cases(void **state)
{
    mqrpc_fault f;
    json_t *res;
    (void)state;
    assert_int_equal(mqr_decode_reply(false, "15", 2, &res, &f), MQRPC_OK);
    assert_int_equal(json_integer_value(res), 15);
    json_decref(res);
    assert_int_equal(mqr_decode_reply(false, "{oops", 5, &res, &f),
                     MQRPC_EBADREPLY);
    assert_non_null(strstr(f.message, "reply is not valid JSON"));
    assert_int_equal(mqr_decode_reply(true, "{}", 2, &res, &f),
                     MQRPC_EBADREPLY);
    assert_int_equal(
        mqr_decode_reply(true, "{\"error\": {\"code\": \"x\"}}", 24, &res, &f),
        MQRPC_EREMOTE);
    assert_string_equal(f.code, "x");
    assert_string_equal(f.message, "(no message)");
}

/* ---------------------------------------------------------------- url */

static void url_parse_defaults_and_vhost(void **state)
{
    mqr_url u;
    char err[256];
    (void)state;
    assert_int_equal(mqr_url_parse("amqp://", &u, err, sizeof err), MQRPC_OK);
    assert_string_equal(u.host, "localhost");
    assert_int_equal(u.port, 5672);
    assert_string_equal(u.user, "guest");
    assert_string_equal(u.vhost, "/");
    mqr_url_clear(&u);
    /* A trailing slash means the default vhost, as pika reads it. */
    assert_int_equal(
        mqr_url_parse("amqp://u:p@127.0.0.1:5682/", &u, err, sizeof err),
        MQRPC_OK);
    assert_string_equal(u.vhost, "/");
    assert_int_equal(u.port, 5682);
    assert_string_equal(u.password, "p");
    mqr_url_clear(&u);
    assert_int_equal(mqr_url_parse("amqp://h/prod%2Fa", &u, err, sizeof err),
                     MQRPC_OK);
    assert_string_equal(u.vhost, "prod/a");
    assert_false(u.tls);
    mqr_url_clear(&u);
    assert_int_equal(mqr_url_parse("amqps://h", &u, err, sizeof err), MQRPC_OK);
    assert_true(u.tls);
    assert_int_equal(u.port, 5671);
    mqr_url_clear(&u);
}

static void url_parse_rejects_and_hides_the_password(void **state)
{
    mqr_url u;
    char err[256];
    (void)state;
    assert_int_equal(mqr_url_parse("http://u:secret@h/", &u, err, sizeof err),
                     MQRPC_EURL);
    assert_non_null(strstr(err, "malformed broker URL"));
    assert_null(strstr(err, "secret"));
    assert_int_equal(mqr_url_parse("amqp://h:notaport/", &u, err, sizeof err),
                     MQRPC_EURL);
    assert_int_equal(mqr_url_parse("", &u, err, sizeof err), MQRPC_EURL);
}

static void url_redact(void **state)
{
    char buf[128];
    (void)state;
    mqrpc_url_redact("amqp://user:s3cret@host:5672/", buf, sizeof buf);
    assert_string_equal(buf, "amqp://user:****@host:5672/");
    mqrpc_url_redact("amqp://host/", buf, sizeof buf);
    assert_string_equal(buf, "amqp://host/");
    mqrpc_url_redact("amqp://user@host/", buf, sizeof buf);
    assert_string_equal(buf, "amqp://user@host/");
}

static void default_url_precedence(void **state)
{
    char dir[] = "/tmp/mqrpc-url-XXXXXX", path[256], buf[256];
    const char *src;
    FILE *f;
    (void)state;
    assert_non_null(mkdtemp(dir));
    setenv("MQRPC_STATE_DIR", dir, 1);
    unsetenv("AMQP_URL");
    assert_int_equal(mqrpc_default_url(NULL, buf, sizeof buf, &src), MQRPC_OK);
    assert_string_equal(buf, "amqp://guest:guest@localhost:5672/");
    assert_string_equal(src, "default");
    snprintf(path, sizeof path, "%s/amqp_url", dir);
    f = fopen(path, "w");
    fputs("amqp://s:p@127.0.0.1:5682/\n", f);
    fclose(f);
    assert_int_equal(mqrpc_default_url(NULL, buf, sizeof buf, &src), MQRPC_OK);
    assert_string_equal(buf, "amqp://s:p@127.0.0.1:5682/");
    assert_string_equal(src, "state file");
    setenv("AMQP_URL", "amqp://e@h/", 1);
    assert_int_equal(mqrpc_default_url(NULL, buf, sizeof buf, &src), MQRPC_OK);
    assert_string_equal(buf, "amqp://e@h/");
    assert_string_equal(src, "AMQP_URL");
    assert_int_equal(mqrpc_default_url("amqp://x@y/", buf, sizeof buf, &src),
                     MQRPC_OK);
    assert_string_equal(buf, "amqp://x@y/");
    assert_string_equal(src, "--url");
    assert_int_equal(mqrpc_default_url("amqp://x@y/", buf, 5, &src),
                     MQRPC_EINVAL);
    unsetenv("AMQP_URL");
    unlink(path);
    rmdir(dir);
}

/* ---------------------------------------------------------------- cli */

static int parse(struct cli *c, int argc, char **argv)
{
    return cli_parse(c, argc, argv);
}

static void cli_caller_options(void **state)
{
    char *ok[] = {"rpc_client", "--timeout", "250", "--url", "amqp://h/",
                  "-v",         "soma",      "-1",  "2",     NULL};
    struct cli c = {
        .prog = "t", .usage = "", .summary = "", .flags = CLI_CALLER};
    (void)state;
    assert_int_equal(parse(&c, 9, ok), -1);
    assert_int_equal(c.timeout_ms, 250);
    assert_string_equal(c.url, "amqp://h/");
    assert_true(c.verbose);
    assert_int_equal(c.heartbeat_s, MQRPC_DEFAULT_HEARTBEAT);
    /* Operands start at "soma"; "-1" is a number, not an option. */
    assert_int_equal(c.optind, 6);

    char *zero[] = {"rpc_client", "--timeout", "0", NULL};
    struct cli c2 = {
        .prog = "t", .usage = "", .summary = "", .flags = CLI_CALLER};
    assert_int_equal(parse(&c2, 3, zero), CLI_EXIT_USAGE);
    char *bogus[] = {"rpc_client", "--bogus", NULL};
    struct cli c3 = {
        .prog = "t", .usage = "", .summary = "", .flags = CLI_CALLER};
    assert_int_equal(parse(&c3, 2, bogus), CLI_EXIT_USAGE);
    char *noval[] = {"rpc_client", "--url", NULL};
    struct cli c4 = {
        .prog = "t", .usage = "", .summary = "", .flags = CLI_CALLER};
    assert_int_equal(parse(&c4, 2, noval), CLI_EXIT_USAGE);
    /* Service options are not caller options. */
    char *svc[] = {"rpc_client", "--prefetch", "4", NULL};
    struct cli c5 = {
        .prog = "t", .usage = "", .summary = "", .flags = CLI_CALLER};
    assert_int_equal(parse(&c5, 3, svc), CLI_EXIT_USAGE);
}

static void cli_service_options(void **state)
{
    struct cli_extra extra[] = {
        {.name = "db", .arg = "PATH", .help = "db", .value = "default.db"},
        {.name = NULL}};
    char *ok[] = {"svc", "--queue", "q1",   "--prefetch",  "8", "--max-body",
                  "100", "--db",    "x.db", "--heartbeat", "0", "--workers",
                  "3",   NULL};
    struct cli c = {.prog = "t",
                    .usage = "",
                    .summary = "",
                    .flags = CLI_SERVICE,
                    .extra = extra,
                    .queue = "dflt"};
    (void)state;
    assert_int_equal(parse(&c, 13, ok), -1);
    assert_string_equal(c.queue, "q1");
    assert_int_equal(c.prefetch, 8);
    assert_int_equal(c.workers, 3);
    assert_int_equal(c.max_body, 100);
    assert_string_equal(extra[0].value, "x.db");
    assert_int_equal(c.heartbeat_s, -1); /* 0 on the command line: disabled */

    char *bad[] = {"svc", "--prefetch", "0", NULL};
    struct cli c2 = {
        .prog = "t", .usage = "", .summary = "", .flags = CLI_SERVICE};
    assert_int_equal(parse(&c2, 3, bad), CLI_EXIT_USAGE);
    char *bad2[] = {"svc", "--prefetch", "70000", NULL};
    struct cli c3 = {
        .prog = "t", .usage = "", .summary = "", .flags = CLI_SERVICE};
    assert_int_equal(parse(&c3, 3, bad2), CLI_EXIT_USAGE);
    char *help[] = {"svc", "--help", NULL};
    struct cli c4 = {.prog = "t",
                     .usage = "",
                     .summary = "",
                     .flags = CLI_SERVICE,
                     .queue = "q"};
    assert_int_equal(parse(&c4, 2, help), CLI_EXIT_OK);
    /* One worker unless asked; at most CLI_MAX_WORKERS. */
    char *none[] = {"svc", NULL};
    struct cli c5 = {
        .prog = "t", .usage = "", .summary = "", .flags = CLI_SERVICE};
    assert_int_equal(parse(&c5, 1, none), -1);
    assert_int_equal(c5.workers, 1);
    char *many[] = {"svc", "--workers", "65", NULL};
    struct cli c6 = {
        .prog = "t", .usage = "", .summary = "", .flags = CLI_SERVICE};
    assert_int_equal(parse(&c6, 3, many), CLI_EXIT_USAGE);
}

/* Program options: short aliases, and flags that take no value. */
static void cli_extra_short_and_flags(void **state)
{
    struct cli_extra extra[] = {{.name = "calls",
                                 .arg = "N",
                                 .help = "n",
                                 .value = "10",
                                 .short_name = 'n'},
                                {.name = "json", .help = "as JSON"},
                                {.name = NULL}};
    char *ok[] = {"b", "-n", "500", "--json", "rest", NULL};
    struct cli c = {.prog = "t", .usage = "", .summary = "", .extra = extra};
    (void)state;
    assert_int_equal(parse(&c, 5, ok), -1);
    assert_string_equal(extra[0].value, "500");
    assert_string_equal(extra[1].value, "1");
    assert_int_equal(c.optind, 4);

    extra[0].value = "10";
    extra[1].value = NULL;
    char *dflt[] = {"b", NULL};
    struct cli c2 = {.prog = "t", .usage = "", .summary = "", .extra = extra};
    assert_int_equal(parse(&c2, 1, dflt), -1);
    assert_string_equal(extra[0].value, "10");
    assert_null(extra[1].value);

    char *noval[] = {"b", "-n", NULL};
    struct cli c3 = {.prog = "t", .usage = "", .summary = "", .extra = extra};
    assert_int_equal(parse(&c3, 2, noval), CLI_EXIT_USAGE);
}

static void exit_codes_are_the_documented_ones(void **state)
{
    (void)state;
    assert_int_equal(cli_exit_code(MQRPC_OK), 0);
    assert_int_equal(cli_exit_code(MQRPC_EREMOTE), 1);
    assert_int_equal(cli_exit_code(MQRPC_EURL), 2);
    assert_int_equal(cli_exit_code(MQRPC_ECONNECT), 3);
    assert_int_equal(cli_exit_code(MQRPC_EAUTH), 3);
    assert_int_equal(cli_exit_code(MQRPC_ECLOSED), 3);
    assert_int_equal(cli_exit_code(MQRPC_ETIMEOUT), 4);
    assert_int_equal(cli_exit_code(MQRPC_ENOROUTE), 5);
    assert_int_equal(cli_exit_code(MQRPC_EBADREPLY), 6);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(every_error_has_a_name_and_a_sentence),
        cmocka_unit_test(fault_set_formats_and_returns_null),
        cmocka_unit_test(decode_request_accepts_objects),
        cmocka_unit_test(decode_request_rejects_bad_bodies),
        cmocka_unit_test(encode_matches_what_the_seed_sends),
        cmocka_unit_test(faults_round_trip),
        cmocka_unit_test(decode_reply_cases),
        cmocka_unit_test(url_parse_defaults_and_vhost),
        cmocka_unit_test(url_parse_rejects_and_hides_the_password),
        cmocka_unit_test(url_redact),
        cmocka_unit_test(default_url_precedence),
        cmocka_unit_test(cli_caller_options),
        cmocka_unit_test(cli_service_options),
        cmocka_unit_test(cli_extra_short_and_flags),
        cmocka_unit_test(exit_codes_are_the_documented_ones),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
