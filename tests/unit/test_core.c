/* Unit tests of the library's pure parts (no broker): the error table, the
 * message codec, broker URL handling, and the programs' option parsing. */
#include "cli.h"
#include "internal.h"
#include "metrics.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

/* ------------------------------------------------------------- errors */

static void every_error_has_a_name_and_a_sentence(void **state)
{
    int count = 0;
    (void)state;
    /* The enum's size is not public (it grows); walk until "unknown". */
    while (strcmp(mqrpc_errname((mqrpc_err)count), "unknown") != 0)
        count++;
    assert_int_equal(count, MQRPC_EBLOCKED + 1);
    for (int e = 0; e < count; e++) {
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
    assert_int_equal(mqr_decode_request(body, strlen(body), NULL, &v, &f),
                     MQRPC_OK);
    assert_int_equal(json_integer_value(json_object_get(v, "a")), 10);
    json_decref(v);
}

static void expect_bad_request(const char *body, size_t len,
                               const mqr_limits *lim, const char *fragment)
{
    mqrpc_fault f;
    json_t *v = (json_t *)1;
    assert_int_equal(mqr_decode_request(body, len, lim, &v, &f), MQRPC_EINVAL);
    assert_null(v);
    assert_string_equal(f.code, "bad_request");
    if (!strstr(f.message, fragment))
        fail_msg("message \"%s\" lacks \"%s\"", f.message, fragment);
}

static void decode_request_rejects_bad_bodies(void **state)
{
    mqr_limits small_body = {.max_body = 4};
    (void)state;
    expect_bad_request("nope", 4, NULL, "not valid JSON");
    expect_bad_request("", 0, NULL, "not valid JSON");
    expect_bad_request("[1, 2]", 6, NULL, "must be a JSON object, got array");
    expect_bad_request("15", 2, NULL, "got integer");
    expect_bad_request("\"x\"", 3, NULL, "got string");
    expect_bad_request("{\"a\": \"\xff\"}", 10, NULL, "not valid JSON");
    expect_bad_request("{\"a\": 1}", 8, &small_body,
                       "is 8 bytes, over the limit of 4");
}

/* nested returns {"a": [[...[1]...]]} nested levels deep, counting the
 * object as level 1 (malloc'd). */
static char *nested(size_t levels)
{
    size_t inner = levels - 1, len = 8 + 2 * inner;
    char *s = malloc(len + 1);

    assert_non_null(s);
    memcpy(s, "{\"a\": ", 6);
    memset(s + 6, '[', inner);
    s[6 + inner] = '1';
    memset(s + 7 + inner, ']', inner);
    s[len - 1] = '}';
    s[len] = '\0';
    return s;
}

static void expect_decodes(const char *body, size_t len, const mqr_limits *lim)
{
    mqrpc_fault f;
    json_t *v = NULL;
    if (mqr_decode_request(body, len, lim, &v, &f) != MQRPC_OK)
        fail_msg("rejected: %s", f.message);
    assert_true(json_is_object(v));
    json_decref(v);
}

static void decode_request_depth_limit(void **state)
{
    mqr_limits three = {.max_depth = 3};
    const char *strings = "{\"a\": \"[[[{{\\\"[[\", \"b\": [[\"]\"]]}";
    char *s;
    (void)state;
    expect_decodes("{\"a\": [[1]]}", 12, &three);
    expect_bad_request("{\"a\": [[[1]]]}", 14, &three,
                       "request nested deeper than 3 levels");
    expect_bad_request("{\"a\": [{\"b\": {}}]}", 18, &three,
                       "nested deeper than 3");
    /* Brackets in strings, after an escaped quote too, are not levels. */
    expect_decodes(strings, strlen(strings), &three);
    /* jansson's own limit is 2048; ours answers first when lower. */
    s = nested(200);
    expect_decodes(s, strlen(s), &(mqr_limits){.max_depth = 200});
    expect_bad_request(s, strlen(s), &(mqr_limits){.max_depth = 199},
                       "nested deeper than 199 levels");
    free(s);
}

/* 100000 '[' would recurse 100000 times in a naive parser: refused by a
 * scan, without parsing (ASan builds catch a deep stack). */
static void decode_request_refuses_deep_nesting_early(void **state)
{
    mqr_limits big_body = {.max_body = 300000};
    char *deep = malloc(200001);
    (void)state;
    assert_non_null(deep);
    memset(deep, '[', 100000);
    memset(deep + 100000, ']', 100000);
    deep[200000] = '\0';
    expect_bad_request(deep, 200000, &big_body,
                       "request nested deeper than 32 levels");
    /* Unbalanced: only openings. */
    expect_bad_request(deep, 100000, &big_body, "nested deeper than 32");
    free(deep);
}

/* A string of n bytes 'x' in "{"k": "..."}" or as a key; malloc'd. */
static char *with_string(size_t n, bool as_key)
{
    char *s = malloc(n + 32);
    size_t at = as_key ? 2 : 7;

    assert_non_null(s);
    memcpy(s, as_key ? "{\"" : "{\"k\": \"", at);
    memset(s + at, 'x', n);
    strcpy(s + at + n, as_key ? "\": 1}" : "\"}");
    return s;
}

static void decode_request_string_limit(void **state)
{
    mqr_limits ten = {.max_string = 10};
    char *s;
    (void)state;
    s = with_string(10, false);
    expect_decodes(s, strlen(s), &ten);
    free(s);
    s = with_string(11, false);
    expect_bad_request(s, strlen(s), &ten, "string longer than 10 bytes at .k");
    free(s);
    s = with_string(10, true);
    expect_decodes(s, strlen(s), &ten);
    free(s);
    s = with_string(11, true);
    expect_bad_request(s, strlen(s), &ten,
                       "object key longer than 10 bytes at .xxxxxxxxxxx");
    free(s);
    /* Decoded bytes count: five "\u00e9" are 30 bytes on the wire, 10 in
     * UTF-8; a sixth makes 12. */
    expect_decodes("{\"k\": \"\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\"}", 39,
                   &ten);
    expect_bad_request(
        "{\"k\": \"\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\"}", 45, &ten,
        "string longer than 10 bytes at .k");
    /* The path leads to the string. */
    expect_bad_request("{\"a\": [1, {\"b\": \"0123456789ab\"}]}", 33, &ten,
                       "string longer than 10 bytes at .a[1].b");
}

/* A hostile key is quoted short, on one line and as valid UTF-8, so the
 * error reply can still be encoded. */
static void decode_request_quotes_keys_safely(void **state)
{
    mqr_limits lim = {.max_string = 30};
    /* 7 x "\\n" then 20 x "é": the cut at 24 bytes falls inside an "é". */
    const char *body = "{\"\\n\\n\\n\\n\\n\\n\\néééééééééééééééééééé\": 1}";
    mqrpc_fault f;
    json_t *v = (json_t *)1, *m;
    (void)state;
    assert_int_equal(mqr_decode_request(body, strlen(body), &lim, &v, &f),
                     MQRPC_EINVAL);
    assert_string_equal(f.code, "bad_request");
    assert_null(strchr(f.message, '\n'));
    assert_non_null(strstr(f.message, "at .???????éééééééé..."));
    assert_true(strlen(f.message) < 80);
    m = json_string(f.message); /* NULL if not valid UTF-8 */
    assert_non_null(m);
    json_decref(m);
}

/* A path too long for a message ends in "..." after whole components. */
static void decode_request_cuts_long_paths(void **state)
{
    mqr_limits lim = {.max_string = 30};
    char body[1024], *p = body;
    mqrpc_fault f;
    json_t *v;
    size_t n;
    (void)state;
    for (int i = 0; i < 10; i++)
        p += sprintf(p, "{\"level_%d_aaaaaaaaaaaaaaaa\": ", i);
    p += sprintf(p, "\"a string of more than thirty bytes\"");
    for (int i = 0; i < 10; i++)
        *p++ = '}';
    expect_bad_request(
        body, (size_t)(p - body), &lim,
        "string longer than 30 bytes at .level_0_aaaaaaaaaaaaaaaa"
        ".level_1_aaaaaaaaaaaaaaaa");
    assert_int_equal(mqr_decode_request(body, (size_t)(p - body), &lim, &v, &f),
                     MQRPC_EINVAL);
    n = strlen(f.message);
    assert_true(n < 220);
    assert_string_equal(f.message + n - 3, "...");
}

static void decode_request_rejects_invalid_utf8(void **state)
{
    (void)state;
    /* jansson checks every string and key; we only make it bad_request. */
    expect_bad_request("{\"a\": \"\xff\"}", 10, NULL, "not valid JSON");
    expect_bad_request("{\"\xc3\": 1}", 8, NULL, "not valid JSON");
    expect_bad_request("{\"a\": \"\xc0\xaf\"}", 11, NULL, "not valid JSON");
    expect_bad_request("{\"a\": \"\xed\xa0\x80\"}", 12, NULL, "not valid JSON");
}

/* Zero limits, or no limits at all, mean MQRPC_DEFAULT_MAX_*. */
static void decode_request_defaults_when_zero(void **state)
{
    mqr_limits zero = {0, 0, 0};
    const mqr_limits *lims[] = {&zero, NULL};
    char *s;
    (void)state;
    assert_int_equal(MQRPC_DEFAULT_MAX_DEPTH, 32);
    assert_int_equal(MQRPC_DEFAULT_MAX_STRING, 65536);
    for (int i = 0; i < 2; i++) {
        s = nested(32);
        expect_decodes(s, strlen(s), lims[i]);
        free(s);
        s = nested(33);
        expect_bad_request(s, strlen(s), lims[i],
                           "request nested deeper than 32 levels");
        free(s);
        s = with_string(65536, false);
        expect_decodes(s, strlen(s), lims[i]);
        free(s);
        s = with_string(65537, true);
        expect_bad_request(s, strlen(s), lims[i],
                           "object key longer than 65536 bytes");
        free(s);
    }
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

/* parse_ok parses url, which must succeed, and checks its fields. */
static void parse_ok(const char *url, const char *user, const char *password,
                     const char *host, int port, const char *vhost)
{
    mqr_url u;
    char err[256];
    assert_int_equal(mqr_url_parse(url, &u, err, sizeof err), MQRPC_OK);
    assert_string_equal(u.user, user);
    assert_string_equal(u.password, password);
    assert_string_equal(u.host, host);
    assert_int_equal(u.port, port);
    assert_string_equal(u.vhost, vhost);
    mqr_url_clear(&u);
}

/* parse_bad parses url, which must fail with a one-line message holding
 * why and never secret (when not NULL). */
static void parse_bad(const char *url, const char *why, const char *secret)
{
    mqr_url u;
    char err[256];
    assert_int_equal(mqr_url_parse(url, &u, err, sizeof err), MQRPC_EURL);
    assert_non_null(strstr(err, "malformed broker URL \""));
    if (!strstr(err, why))
        fail_msg("\"%s\": \"%s\" does not say \"%s\"", url, err, why);
    assert_null(strchr(err, '\n'));
    if (secret)
        assert_null(strstr(err, secret));
    assert_null(u.buf_);
}

/* The cases the URL parser must agree on with rabbitmq-c's amqp_parse_url,
 * and those where it refuses what rabbitmq-c took in a surprising way. */
static void url_parse_edge_cases(void **state)
{
    (void)state;
    /* IPv6 in brackets, with a port, a user, a zone (%25 is '%'). */
    parse_ok("amqp://[::1]", "guest", "guest", "::1", 5672, "/");
    parse_ok("amqps://u:p@[2001:db8::7]:5681/v", "u", "p", "2001:db8::7", 5681,
             "v");
    parse_ok("amqp://[fe80::1%25eth0]:1/", "guest", "guest", "fe80::1%eth0", 1,
             "/");
    /* Percent-encoded user, password, host and vhost; the delimiters
     * encoded are data, '@' and ':' in a password included. */
    parse_ok("amqp://us%65r%40x:p%40ss%3Aw%2F%3F%23@ho%73t/v%2fh", "user@x",
             "p@ss:w/?#", "host", 5672, "v/h");
    parse_ok("amqp://u:%C3%A9t%C3%A9@h/", "u", "\xC3\xA9t\xC3\xA9", "h", 5672,
             "/");
    parse_ok("amqp://u:!$&'()*+,;=@h/%2f", "u", "!$&'()*+,;=", "h", 5672, "/");
    /* Missing parts take the defaults; a user without a password gets
     * guest's, as in rabbitmq-c; an empty host is localhost. */
    parse_ok("amqp://u@h", "u", "guest", "h", 5672, "/");
    parse_ok("amqp://u:@h", "u", "", "h", 5672, "/");
    parse_ok("amqp://:p@h", "", "p", "h", 5672, "/");
    parse_ok("amqp://u:p@", "u", "p", "localhost", 5672, "/");
    parse_ok("amqp://:5673", "guest", "guest", "localhost", 5673, "/");
    parse_ok("amqp:///v", "guest", "guest", "localhost", 5672, "v");
    parse_ok("amqps://h:65535", "guest", "guest", "h", 65535, "/");
    parse_ok("amqp://h:005672/", "guest", "guest", "h", 5672, "/");

    parse_bad("amqp://u:p@h:99999/", "port must be 1 to 65535", NULL);
    parse_bad("amqp://u:secret@h:0/", "port must be 1 to 65535", "secret");
    parse_bad("amqp://h:65536/", "port must be 1 to 65535", NULL);
    parse_bad("amqp://h:99999999999999999999999/", "1 to 65535", NULL);
    parse_bad("amqp://h:/", "no port after ':'", NULL);
    parse_bad("amqp://h:+5672/", "port must be a decimal number", NULL);
    parse_bad("amqp://h: 5672/", "port must be a decimal number", NULL);
    parse_bad("amqp://h:%35672/", "port must be a decimal number", NULL);
    parse_bad("amqp://h:1:2/", "port must be a decimal number", NULL);
    parse_bad("amqp://[::1]:0/", "port must be 1 to 65535", NULL);
    parse_bad("amqp://[]/", "empty IPv6 address", NULL);
    parse_bad("amqp://[::1/", "no ']' closes", NULL);
    parse_bad("amqp://[::1]x/", "only :PORT may follow", NULL);
    parse_bad("amqp://x[::1]/", "may only enclose a whole IPv6", NULL);
    /* Trailing garbage, and delimiters that must be encoded. */
    parse_bad("amqp://h/v/x", "one path segment", NULL);
    parse_bad("amqp://h//", "one path segment", NULL);
    parse_bad("amqp://h/v@x", "in a vhost must be written", NULL);
    parse_bad("amqp://h/v#x", "'#' must be written %23", NULL);
    parse_bad("amqp://u:top#secret@h/", "'#'", "top#secret");
    parse_bad("amqp://u:p@ss@h/", "'@' in a user name or password", "p@ss");
    parse_bad("amqp://u:ab:cd@h/", "':' in a password", "ab:cd");
    /* A raw '/' in a password ends the authority early: whatever the
     * rest then looks like, it is refused and the password masked. */
    parse_bad("amqp://u:pw/x@h/", "port must be a decimal number", "pw/x");
    parse_bad("amqp://u:12/xyzw@h/", "one path segment", "12/xyzw");
    parse_bad("amqp://u:12/xyzw@h", "in a vhost must be written", "12/xyzw");
    parse_bad("amqp://h/%zz", "two hex digits", NULL);
    parse_bad("amqp://h/%4", "two hex digits", NULL);
    parse_bad("amqp://u:a%00bcdef@h/", "%00", "bcdef");
    parse_bad("AMQP://h/", "must start with amqp:// or amqps://", NULL);
    parse_bad("amqp:/h/", "must start with amqp:// or amqps://", NULL);
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
    /* A raw '@' or '/' in the password is masked too; the query is kept. */
    mqrpc_url_redact("amqps://u:p@ss/w@host/?cacertfile=/ca@x.pem", buf,
                     sizeof buf);
    assert_string_equal(buf, "amqps://u:****@host/?cacertfile=/ca@x.pem");
}

/* ---------------------------------------------------------- URL lists */

static void url_list_entries(void **state)
{
    mqr_str e[4];
    (void)state;
    assert_int_equal(mqr_url_entries(NULL, e, 4), 0);
    assert_int_equal(mqr_url_entries("amqp://u:p@h1:5682/", e, 4), 1);
    assert_int_equal(
        mqr_url_entries("amqp://u:p@h1:5682/, amqps://u:p@h2:5683/v", e, 4), 2);
    assert_int_equal(e[0].len, strlen("amqp://u:p@h1:5682/"));
    assert_memory_equal(e[1].ptr, "amqps://u:p@h2:5683/v", e[1].len);
    /* A ',' not followed by a scheme is data: a raw password, a vhost. */
    assert_int_equal(mqr_url_entries("amqp://u:a,b@h/x,y", e, 4), 1);
    assert_int_equal(e[0].len, strlen("amqp://u:a,b@h/x,y"));
    /* Counted beyond max. */
    assert_int_equal(mqr_url_entries("amqp://a,amqp://b,amqp://c", e, 2), 3);
}

/* list_bad checks list, which must fail with code and an err holding
 * why, one line, and never "secret". */
static void list_bad(const char *list, mqrpc_err code, const char *why)
{
    char err[512];
    mqrpc_tls_opts tls = {.ca_file = "/ca.pem"};

    assert_int_equal(mqrpc_url_check(list, strstr(why, "TLS") ? &tls : NULL,
                                     err, sizeof err),
                     code);
    if (!strstr(err, why))
        fail_msg("\"%s\": \"%s\" does not say \"%s\"", list, err, why);
    assert_null(strchr(err, '\n'));
    assert_null(strstr(err, "secret"));
}

static void url_list_check_names_the_entry(void **state)
{
    char err[256];
    (void)state;
    assert_int_equal(mqrpc_url_check("amqp://u:p@127.0.0.1:5682/,"
                                     "amqp://u:p@127.0.0.1:5683/",
                                     NULL, err, sizeof err),
                     MQRPC_OK);
    list_bad("amqp://a/,amqp://u:secret@h:x/,amqp://c/", MQRPC_EURL,
             "entry 2 of 3: malformed broker URL \"amqp://u:****@h:x/\": port "
             "must be a decimal number");
    list_bad("amqp://a/,http://u:secret@b/", MQRPC_EURL,
             "entry 2 of 2: malformed broker URL \"http://u:****@b/\": it "
             "must start with amqp://");
    list_bad("amqp://u:secret@a/,,amqp://c/", MQRPC_EURL,
             "entry 1 of 2: \"amqp://u:****@a/,\" ends with ','");
    list_bad(",amqp://a/", MQRPC_EURL, "entry 1 of 2: empty broker URL");
    list_bad("", MQRPC_EURL, "empty broker URL");
    /* One URL: the message it always had, without a position. */
    list_bad("amqp://h:x/", MQRPC_EURL, "malformed broker URL \"amqp://h:x/\"");
    /* TLS options need amqps:// in every entry. */
    list_bad("amqps://a/,amqp://b/", MQRPC_EINVAL,
             "entry 2 of 2: TLS options given for a plain amqp:// URL");
    list_bad("amqps://a/,amqp://b/?cacertfile=/x", MQRPC_EURL,
             "entry 2 of 2: URL parameters cacertfile, certfile and keyfile "
             "need an amqps:// URL");
    {
        char big[65 * 12 + 1] = "";
        for (int i = 0; i < 65; i++)
            strcat(big, i ? ",amqp://h/" : "amqp://h/");
        list_bad(big, MQRPC_EURL, "65 broker URLs in the list, over the "
                                  "limit of 64");
    }
}

static void url_list_redact_and_plaintext(void **state)
{
    char buf[256];
    (void)state;
    mqrpc_url_redact("amqp://u:s1@h1:5682/,amqp://v:s2@h2:5683/", buf,
                     sizeof buf);
    assert_string_equal(buf, "amqp://u:****@h1:5682/,amqp://v:****@h2:5683/");
    mqrpc_url_redact("amqp://u:s1@h1/, amqps://h2/", buf, sizeof buf);
    assert_string_equal(buf, "amqp://u:****@h1/,amqps://h2/");
    /* Cut short, still NUL-terminated, never a password. */
    mqrpc_url_redact("amqp://u:s1@h1:5682/,amqp://v:secret@h2:5683/", buf, 30);
    assert_true(strlen(buf) < 30);
    assert_null(strstr(buf, "secret"));
    /* One clear-text remote entry is enough for the warning. */
    assert_int_equal(
        mqrpc_url_plaintext_remote("amqp://u:p@127.0.0.1/,amqps://u:p@b.lan/"),
        0);
    assert_int_equal(
        mqrpc_url_plaintext_remote("amqps://u:p@a.lan/,amqp://u:p@b.lan/"), 1);
}

static void url_list_shuffle(void **state)
{
    unsigned order[8], count[3][3] = {{0}};
    char out[64];
    (void)state;
    /* Seed 0: the list's own order. */
    mqr_url_order(0, order, 8);
    for (unsigned i = 0; i < 8; i++)
        assert_int_equal(order[i], i);
    /* A permutation, the same for the same seed. */
    for (uint64_t seed = 1; seed < 200; seed++) {
        unsigned seen = 0, again[8];
        mqr_url_order(seed * 0x9E3779B97F4A7C15ull | 1, order, 8);
        mqr_url_order(seed * 0x9E3779B97F4A7C15ull | 1, again, 8);
        assert_memory_equal(order, again, sizeof order);
        for (unsigned i = 0; i < 8; i++)
            seen |= 1u << order[i];
        assert_int_equal(seen, 0xffu);
    }
    /* Spread: over many handles, each address comes first about as often
     * (3 entries, 3000 seeds: 1000 each; at least 800). */
    for (uint64_t seed = 1; seed <= 3000; seed++) {
        mqr_url_order(seed * 0x9E3779B97F4A7C15ull | 1, order, 3);
        for (unsigned i = 0; i < 3; i++)
            count[i][order[i]]++;
    }
    for (unsigned i = 0; i < 3; i++)
        for (unsigned j = 0; j < 3; j++)
            assert_in_range(count[i][j], 800, 1200);
    /* pick walks the order and wraps around. */
    {
        const char *list = "amqp://a/,amqp://b/,amqp://c/";
        unsigned n, seen = 0;
        uint64_t seed = 12345;
        mqr_url_order(seed, order, 3);
        for (unsigned next = 0; next < 6; next++) {
            assert_int_equal(mqr_url_pick(list, seed, next, out, sizeof out, &n),
                             MQRPC_OK);
            assert_int_equal(n, 3);
            assert_int_equal(out[7], "abc"[order[next % 3]]);
            seen |= 1u << (out[7] - 'a');
        }
        assert_int_equal(seen, 7);
        assert_int_equal(mqr_url_pick(list, seed, 0, out, 5, &n), MQRPC_EINVAL);
    }
}

/* The order of attempts over a list: the next address at once, the
 * backoff only when a whole round failed; a loss moves on. */
static void url_list_attempt_policy(void **state)
{
    mqr_addrs a = {.seed = 7};
    (void)state;
    a.count = 3;
    assert_false(mqr_addrs_failed(&a)); /* 2nd address at once */
    assert_false(mqr_addrs_failed(&a)); /* 3rd at once */
    assert_true(mqr_addrs_failed(&a));  /* all failed: back off */
    assert_int_equal(a.next, 3);
    assert_false(mqr_addrs_failed(&a)); /* a new round */
    mqr_addrs_connected(&a);
    assert_int_equal(a.next, 4);
    mqr_addrs_lost(&a); /* moves past the node that went */
    assert_int_equal(a.next, 5);
    assert_false(mqr_addrs_failed(&a));
    assert_false(mqr_addrs_failed(&a));
    assert_true(mqr_addrs_failed(&a));
    {
        char buf[16] = "";
        mqr_append(buf, sizeof buf, "; ", "a: refused");
        mqr_append(buf, sizeof buf, "; ", "b: refused");
        assert_string_equal(buf, "a: refused; b: "); /* cut, terminated */
    }
    /* One address: back off after every failure, as before lists. */
    a.count = 1;
    assert_true(mqr_addrs_failed(&a));
    assert_true(mqr_addrs_failed(&a));
}

static void write_file(const char *path, const char *text, mode_t mode)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    assert_int_equal(chmod(path, mode), 0);
}

static void default_url_precedence(void **state)
{
    char dir[] = "/tmp/mqrpc-url-XXXXXX", cpath[256], spath[256], buf[256];
    const char *src;
    (void)state;
    assert_non_null(mkdtemp(dir));
    setenv("MQRPC_STATE_DIR", dir, 1);
    unsetenv("AMQP_URL");
    assert_int_equal(
        mqrpc_default_url(NULL, MQRPC_ROLE_CLIENT, buf, sizeof buf, &src),
        MQRPC_OK);
    assert_string_equal(buf, "amqp://guest:guest@localhost:5672/");
    assert_string_equal(src, "default");
    /* Each role reads its own account's file. */
    snprintf(cpath, sizeof cpath, "%s/clients.url", dir);
    snprintf(spath, sizeof spath, "%s/services.url", dir);
    write_file(cpath, "amqp://c:p@127.0.0.1:5682/\n", 0600);
    write_file(spath, "amqp://s:p@127.0.0.1:5682/\n", 0600);
    assert_int_equal(
        mqrpc_default_url(NULL, MQRPC_ROLE_CLIENT, buf, sizeof buf, &src),
        MQRPC_OK);
    assert_string_equal(buf, "amqp://c:p@127.0.0.1:5682/");
    assert_string_equal(src, "state file");
    assert_int_equal(
        mqrpc_default_url(NULL, MQRPC_ROLE_SERVICE, buf, sizeof buf, &src),
        MQRPC_OK);
    assert_string_equal(buf, "amqp://s:p@127.0.0.1:5682/");
    /* A state file others can read is refused, not used. */
    assert_int_equal(chmod(spath, 0644), 0);
    assert_int_equal(
        mqrpc_default_url(NULL, MQRPC_ROLE_SERVICE, buf, sizeof buf, &src),
        MQRPC_EINVAL);
    setenv("AMQP_URL", "amqp://e@h/", 1);
    assert_int_equal(
        mqrpc_default_url(NULL, MQRPC_ROLE_CLIENT, buf, sizeof buf, &src),
        MQRPC_OK);
    assert_string_equal(buf, "amqp://e@h/");
    assert_string_equal(src, "AMQP_URL");
    assert_int_equal(mqrpc_default_url("amqp://x@y/", MQRPC_ROLE_CLIENT, buf,
                                       sizeof buf, &src),
                     MQRPC_OK);
    assert_string_equal(buf, "amqp://x@y/");
    assert_string_equal(src, "--url");
    assert_int_equal(
        mqrpc_default_url("amqp://x@y/", MQRPC_ROLE_CLIENT, buf, 5, &src),
        MQRPC_EINVAL);
    unsetenv("AMQP_URL");
    unlink(cpath);
    unlink(spath);
    rmdir(dir);
}

static void url_file_owner_only(void **state)
{
    char dir[] = "/tmp/mqrpc-urlf-XXXXXX", path[256], buf[64], err[256];
    (void)state;
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/url", dir);
    write_file(path, "amqps://u:secret@h/\nignored\n", 0600);
    assert_int_equal(
        mqrpc_url_file_read(path, buf, sizeof buf, err, sizeof err), MQRPC_OK);
    assert_string_equal(buf, "amqps://u:secret@h/");
    write_file(path, "amqps://u:secret@h/\n", 0640);
    assert_int_equal(
        mqrpc_url_file_read(path, buf, sizeof buf, err, sizeof err),
        MQRPC_EINVAL);
    assert_non_null(strstr(err, "accessible by group or others (mode 0640)"));
    assert_non_null(strstr(err, "chmod 600"));
    assert_null(strstr(err, "secret"));
    write_file(path, "amqps://u:secret@h/\n", 0604);
    assert_int_equal(
        mqrpc_url_file_read(path, buf, sizeof buf, err, sizeof err),
        MQRPC_EINVAL);
    write_file(path, "\n", 0600);
    assert_int_equal(
        mqrpc_url_file_read(path, buf, sizeof buf, err, sizeof err),
        MQRPC_EINVAL);
    assert_non_null(strstr(err, "is empty"));
    unlink(path);
    assert_int_equal(
        mqrpc_url_file_read(path, buf, sizeof buf, err, sizeof err),
        MQRPC_EINVAL);
    assert_non_null(strstr(err, "No such file"));
    /* A directory is not a URL file. */
    assert_int_equal(mqrpc_url_file_read(dir, buf, sizeof buf, err, sizeof err),
                     MQRPC_EINVAL);
    /* Nor is a FIFO, and it is refused at once, not when a writer comes:
     * without one, SIGALRM ends the test. */
    assert_int_equal(mkfifo(path, 0600), 0);
    alarm(10);
    assert_int_equal(
        mqrpc_url_file_read(path, buf, sizeof buf, err, sizeof err),
        MQRPC_EINVAL);
    alarm(0);
    assert_non_null(strstr(err, "is not a regular file"));
    unlink(path);
    rmdir(dir);
}

static void url_tls_parameters(void **state)
{
    mqr_url u;
    char err[256];
    (void)state;
    assert_int_equal(
        mqr_url_parse("amqps://u:p@broker.example:5671/v?cacertfile=/etc/"
                      "ca%20dir/ca.pem&certfile=/c.pem&keyfile=/k.pem",
                      &u, err, sizeof err),
        MQRPC_OK);
    assert_true(u.tls);
    assert_string_equal(u.host, "broker.example");
    assert_int_equal(u.port, 5671);
    assert_string_equal(u.vhost, "v");
    assert_string_equal(u.password, "p");
    assert_string_equal(u.ca_file, "/etc/ca dir/ca.pem");
    assert_string_equal(u.cert_file, "/c.pem");
    assert_string_equal(u.key_file, "/k.pem");
    mqr_url_clear(&u);
    /* amqps:// alone: default port 5671, no files. */
    assert_int_equal(mqr_url_parse("amqps://h", &u, err, sizeof err), MQRPC_OK);
    assert_int_equal(u.port, 5671);
    assert_null(u.ca_file);
    mqr_url_clear(&u);
    assert_int_equal(
        mqr_url_parse("amqps://h/?verify=verify_none", &u, err, sizeof err),
        MQRPC_EURL);
    assert_non_null(strstr(err, "unknown URL parameter \"verify\""));
    assert_int_equal(
        mqr_url_parse("amqp://h/?cacertfile=/ca.pem", &u, err, sizeof err),
        MQRPC_EURL);
    assert_non_null(strstr(err, "need an amqps:// URL"));
    assert_int_equal(
        mqr_url_parse("amqps://h/?cacertfile", &u, err, sizeof err),
        MQRPC_EURL);
    assert_int_equal(
        mqr_url_parse("amqps://h/?cacertfile=%zz", &u, err, sizeof err),
        MQRPC_EURL);
    assert_int_equal(
        mqr_url_parse("amqps://h/?cacertfile=a%00b", &u, err, sizeof err),
        MQRPC_EURL);
}

/* A '?' typed raw in a password starts the query inside the password: the
 * error about its parameters must not quote the password's tail. */
static void url_query_error_hides_password(void **state)
{
    mqr_url u;
    char err[256];
    (void)state;
    assert_int_equal(
        mqr_url_parse("amqp://u:12?secret=x@h/", &u, err, sizeof err),
        MQRPC_EURL);
    assert_non_null(strstr(err, "unknown URL parameter"));
    assert_non_null(strstr(err, "%3F"));
    assert_null(strstr(err, "secret"));
    assert_int_equal(
        mqr_url_parse("amqps://u:12?secret@h/", &u, err, sizeof err),
        MQRPC_EURL);
    assert_non_null(strstr(err, "without a value"));
    assert_null(strstr(err, "secret"));
    /* After the last '@' nothing is password: the name is quoted. */
    assert_int_equal(mqr_url_parse("amqps://u:p@h/?cacertfile=/a@b&bogus=1", &u,
                                   err, sizeof err),
                     MQRPC_EURL);
    assert_non_null(strstr(err, "unknown URL parameter \"bogus\""));
    assert_int_equal(
        mqr_url_parse("amqps://u:p@h/?cacertfile=/a&nil", &u, err, sizeof err),
        MQRPC_EURL);
    assert_non_null(strstr(err, "URL parameter \"nil\" has no value"));
}

static void url_plaintext_remote(void **state)
{
    (void)state;
    assert_int_equal(mqrpc_url_plaintext_remote("amqp://u:p@broker.lan/"), 1);
    assert_int_equal(mqrpc_url_plaintext_remote("amqp://u:p@10.0.0.5:5672/"),
                     1);
    assert_int_equal(mqrpc_url_plaintext_remote("amqp://u:p@localhost/"), 0);
    assert_int_equal(mqrpc_url_plaintext_remote("amqp://u:p@127.0.0.1:1/"), 0);
    assert_int_equal(mqrpc_url_plaintext_remote("amqp://u:p@[::1]:5672/"), 0);
    assert_int_equal(mqrpc_url_plaintext_remote("amqps://u:p@broker.lan/"), 0);
    assert_int_equal(mqrpc_url_plaintext_remote("not a url"), 0);
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
    /* --queue-type: classic (the default, 0) or quorum, nothing else. */
    assert_int_equal(c5.queue_type, MQRPC_QUEUE_CLASSIC);
    char *quorum[] = {"svc", "--queue-type", "quorum", NULL};
    struct cli c7 = {
        .prog = "t", .usage = "", .summary = "", .flags = CLI_SERVICE};
    assert_int_equal(parse(&c7, 3, quorum), -1);
    assert_int_equal(c7.queue_type, MQRPC_QUEUE_QUORUM);
    char *qbad[] = {"svc", "--queue-type", "stream", NULL};
    struct cli c8 = {
        .prog = "t", .usage = "", .summary = "", .flags = CLI_SERVICE};
    assert_int_equal(parse(&c8, 3, qbad), CLI_EXIT_USAGE);
    /* A bad entry of a URL list is a usage error before anything
     * connects. */
    char *lbad[] = {"svc", "--url", "amqp://h/,amqp://h:x/", NULL};
    struct cli c9 = {
        .prog = "t", .usage = "", .summary = "", .flags = CLI_SERVICE};
    assert_int_equal(parse(&c9, 3, lbad), CLI_EXIT_USAGE);
    char *lok[] = {"svc", "--url", "amqp://h1/,amqp://h2/", NULL};
    struct cli c10 = {
        .prog = "t", .usage = "", .summary = "", .flags = CLI_SERVICE};
    assert_int_equal(parse(&c10, 3, lok), -1);
}

/* --max-depth and --max-string: 0 (the library's default) unless given,
 * and range-checked like --max-body. */
static void cli_service_limit_options(void **state)
{
    char *ok[] = {"svc", "--max-depth", "5", "--max-string", "100", NULL};
    char *none[] = {"svc", NULL};
    char *bad[][3] = {
        {"svc", "--max-depth", "0"},          {"svc", "--max-depth", "1025"},
        {"svc", "--max-depth", "x"},          {"svc", "--max-depth", "-1"},
        {"svc", "--max-string", "0"},         {"svc", "--max-string", "1k"},
        {"svc", "--max-string", "134217729"},
    };
    struct cli c = {
        .prog = "t", .usage = "", .summary = "", .flags = CLI_SERVICE};
    (void)state;
    assert_int_equal(parse(&c, 5, ok), -1);
    assert_int_equal(c.max_depth, 5);
    assert_int_equal(c.max_string, 100);
    struct cli c2 = {
        .prog = "t", .usage = "", .summary = "", .flags = CLI_SERVICE};
    assert_int_equal(parse(&c2, 1, none), -1);
    assert_int_equal(c2.max_depth, 0);
    assert_int_equal(c2.max_string, 0);
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char *argv[] = {bad[i][0], bad[i][1], bad[i][2], NULL};
        struct cli c3 = {
            .prog = "t", .usage = "", .summary = "", .flags = CLI_SERVICE};
        assert_int_equal(parse(&c3, 3, argv), CLI_EXIT_USAGE);
    }
    /* Service options only. */
    struct cli c4 = {
        .prog = "t", .usage = "", .summary = "", .flags = CLI_CALLER};
    assert_int_equal(parse(&c4, 5, ok), CLI_EXIT_USAGE);
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

/* Options after the operands, as GNU tools take them; negative numbers
 * stay operands; "--" ends the options. argv is permuted: the operands
 * end up last, from c.optind on, in their order. */
static void cli_options_after_operands(void **state)
{
    char *call[] = {
        "rpc_client", "call", "service_soma", "{\"a\":1,\"b\":2}", "--timeout",
        "4000",       NULL};
    struct cli c = {
        .prog = "t", .usage = "", .summary = "", .flags = CLI_CALLER};
    (void)state;
    assert_int_equal(parse(&c, 6, call), -1);
    assert_int_equal(c.timeout_ms, 4000);
    assert_int_equal(c.optind, 3);
    assert_string_equal(call[3], "call");
    assert_string_equal(call[4], "service_soma");
    assert_string_equal(call[5], "{\"a\":1,\"b\":2}");

    char *soma_v[] = {"rpc_client", "soma", "1", "2", "-v", NULL};
    struct cli c2 = {
        .prog = "t", .usage = "", .summary = "", .flags = CLI_CALLER};
    assert_int_equal(parse(&c2, 5, soma_v), -1);
    assert_true(c2.verbose);
    assert_int_equal(c2.optind, 2);
    assert_string_equal(soma_v[2], "soma");
    assert_string_equal(soma_v[3], "1");
    assert_string_equal(soma_v[4], "2");

    /* Negative numbers anywhere, between options too. */
    char *media[] = {"rpc_client", "media", "-1.5", "--timeout", "300", "2",
                     "-3",         "-.5",   "-1e3", "-v",        NULL};
    struct cli c3 = {
        .prog = "t", .usage = "", .summary = "", .flags = CLI_CALLER};
    assert_int_equal(parse(&c3, 10, media), -1);
    assert_int_equal(c3.timeout_ms, 300);
    assert_true(c3.verbose);
    assert_int_equal(c3.optind, 4);
    const char *want[] = {"media", "-1.5", "2", "-3", "-.5", "-1e3"};
    for (int i = 0; i < 6; i++)
        assert_string_equal(media[4 + i], want[i]);

    char *soma_neg[] = {"rpc_client", "soma", "-5", "3", NULL};
    struct cli c4 = {
        .prog = "t", .usage = "", .summary = "", .flags = CLI_CALLER};
    assert_int_equal(parse(&c4, 4, soma_neg), -1);
    assert_int_equal(c4.optind, 1);
    assert_string_equal(soma_neg[2], "-5");

    /* "--" ends the options: what follows is operands, "-v" included;
     * "-" (stdin) is an operand anyway. */
    char *dd[] = {"rpc_client", "-v",        "busca", "--",
                  "-x",         "--timeout", "-",     NULL};
    struct cli c5 = {
        .prog = "t", .usage = "", .summary = "", .flags = CLI_CALLER};
    assert_int_equal(parse(&c5, 7, dd), -1);
    assert_true(c5.verbose);
    assert_int_equal(c5.timeout_ms, MQRPC_DEFAULT_TIMEOUT_MS);
    assert_int_equal(c5.optind, 3);
    assert_string_equal(dd[3], "busca");
    assert_string_equal(dd[4], "-x");
    assert_string_equal(dd[5], "--timeout");
    assert_string_equal(dd[6], "-");

    /* A value is taken whole, even one that looks like an option, and
     * by the same rules as getopt_long: "--time" is --timeout, "=" and
     * a short option's attached value take no next element. */
    char *vals[] = {"b",  "q",  "--label",   "--x", "--time", "70",
                    "-n", "-5", "--calls=7", "-n9", "j",      NULL};
    struct cli_extra extra[] = {
        {.name = "calls", .arg = "N", .help = "n", .short_name = 'n'},
        {.name = "label", .arg = "S", .help = "l"},
        {.name = NULL}};
    struct cli c6 = {.prog = "t",
                     .usage = "",
                     .summary = "",
                     .flags = CLI_CALLER,
                     .extra = extra};
    assert_int_equal(parse(&c6, 11, vals), -1);
    assert_string_equal(extra[1].value, "--x");
    assert_int_equal(c6.timeout_ms, 70);
    assert_string_equal(extra[0].value, "9");
    assert_int_equal(c6.optind, 9);
    assert_string_equal(vals[9], "q");
    assert_string_equal(vals[10], "j");

    /* An unknown option after the operands is a usage error, as before
     * them; so is an option missing its value at the end. */
    char *bogus[] = {"rpc_client", "soma", "1", "2", "--bogus", NULL};
    struct cli c7 = {
        .prog = "t", .usage = "", .summary = "", .flags = CLI_CALLER};
    assert_int_equal(parse(&c7, 5, bogus), CLI_EXIT_USAGE);
    char *unk[] = {"rpc_client", "busca", "-x", NULL};
    struct cli c8 = {
        .prog = "t", .usage = "", .summary = "", .flags = CLI_CALLER};
    assert_int_equal(parse(&c8, 3, unk), CLI_EXIT_USAGE);
    char *noval[] = {"rpc_client", "info", "--timeout", NULL};
    struct cli c9 = {
        .prog = "t", .usage = "", .summary = "", .flags = CLI_CALLER};
    assert_int_equal(parse(&c9, 3, noval), CLI_EXIT_USAGE);

    /* Services: options after an (unexpected) operand are still read. */
    char *svc[] = {"svc", "extra", "--queue", "q1", NULL};
    struct cli c10 = {.prog = "t",
                      .usage = "",
                      .summary = "",
                      .flags = CLI_SERVICE,
                      .queue = "d"};
    assert_int_equal(parse(&c10, 4, svc), -1);
    assert_string_equal(c10.queue, "q1");
    assert_int_equal(c10.optind, 3);
    assert_string_equal(svc[3], "extra");
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
    assert_int_equal(cli_exit_code(MQRPC_EOVERLOAD), 7);
    assert_int_equal(cli_exit_code(MQRPC_EBLOCKED), 8);
}

/* Reconnection delays: each drawn within [d/2, d], not all the same (so
 * clients spread out), and the doubling stops at the cap. */
static void backoff_jitters_and_caps(void **state)
{
    uint64_t rng = 12345;
    int lo = 1 << 30, hi = 0, d = 100;

    (void)state;
    for (int i = 0; i < 1000; i++) {
        int j = mqr_jitter(&rng, 1000);
        assert_in_range(j, 500, 1000);
        lo = j < lo ? j : lo;
        hi = j > hi ? j : hi;
    }
    assert_true(hi - lo > 250);
    for (int i = 0; i < 20; i++)
        d = mqr_backoff_next(d, 5000);
    assert_int_equal(d, 5000);
    assert_int_equal(mqr_backoff_next(100, 5000), 200);
    assert_int_equal(mqr_backoff_next(3000, 5000), 5000);
}

/* ------------------------------------------------------------ metrics */

static void metric_codes_and_buckets(void **state)
{
    (void)state;
    assert_int_equal(mqrpc_code_of(NULL), MQRPC_CODE_OK);
    assert_int_equal(mqrpc_code_of(""), MQRPC_CODE_OK);
    assert_int_equal(mqrpc_code_of("bad_request"), MQRPC_CODE_BAD_REQUEST);
    assert_int_equal(mqrpc_code_of(MQRPC_DEAD_LETTER), MQRPC_CODE_DEAD_LETTER);
    assert_int_equal(mqrpc_code_of("overloaded"), MQRPC_CODE_OVERLOADED);
    assert_int_equal(mqrpc_code_of("cancelled"), MQRPC_CODE_OTHER);
    /* "other" names the bucket, not a code that lands in it by name. */
    assert_int_equal(mqrpc_code_of("other"), MQRPC_CODE_OTHER);
    for (unsigned i = 0; i < MQRPC_CODE_COUNT; i++)
        assert_non_null(mqrpc_code_name(i));
    assert_null(mqrpc_code_name(MQRPC_CODE_COUNT));
    assert_int_equal(mqr_duration_bucket(0), 0);
    assert_int_equal(mqr_duration_bucket(100), 0);   /* le 0.0001 */
    assert_int_equal(mqr_duration_bucket(101), 1);   /* le 0.00025 */
    assert_int_equal(mqr_duration_bucket(1000000), 12); /* le 1 */
    assert_int_equal(mqr_duration_bucket(60000000), MQRPC_DURATION_BUCKETS - 1);
    assert_int_equal(mqr_duration_bucket(60000001), MQRPC_DURATION_BUCKETS);
}

/* The exposition text: cumulative le buckets ending at +Inf = _count,
 * escaped labels, workers summed. */
static void metrics_text_of_a_service(void **state)
{
    struct metrics_service_info info = {"service_x", "q\"\\\n", 2, 7};
    mqrpc_service_stats a = {0}, b = {0}, sum = {0};
    char *text = NULL;
    size_t len = 0;
    FILE *f;

    (void)state;
    a.replies[MQRPC_CODE_OK] = 3;
    b.replies[MQRPC_CODE_OK] = 2;
    b.replies[MQRPC_CODE_BAD_REQUEST] = 1;
    a.handling[0] = 2;
    b.handling[2] = 3;
    b.handling[MQRPC_DURATION_BUCKETS] = 1;
    a.handling_us = 1500000;
    a.connected = b.connected = 1;
    metrics_sum_service(&sum, &a);
    metrics_sum_service(&sum, &b);
    f = open_memstream(&text, &len);
    assert_non_null(f);
    metrics_write_service(f, &info, &sum);
    fclose(f);
#define Q "queue=\"q\\\"\\\\\\n\""
    assert_non_null(strstr(text, "mqrpc_requests_total{" Q ",code=\"ok\"} 5\n"));
    assert_non_null(
        strstr(text, "mqrpc_requests_total{" Q ",code=\"bad_request\"} 1\n"));
    assert_non_null(strstr(
        text, "mqrpc_request_handling_seconds_bucket{" Q ",le=\"0.0001\"} 2\n"));
    assert_non_null(strstr(
        text, "mqrpc_request_handling_seconds_bucket{" Q ",le=\"0.0005\"} 5\n"));
    assert_non_null(strstr(
        text, "mqrpc_request_handling_seconds_bucket{" Q ",le=\"60\"} 5\n"));
    assert_non_null(strstr(
        text, "mqrpc_request_handling_seconds_bucket{" Q ",le=\"+Inf\"} 6\n"));
    assert_non_null(
        strstr(text, "mqrpc_request_handling_seconds_count{" Q "} 6\n"));
    assert_non_null(
        strstr(text, "mqrpc_request_handling_seconds_sum{" Q "} 1.500000\n"));
    assert_non_null(strstr(text, "mqrpc_connected{" Q "} 2\n"));
    assert_non_null(strstr(text, "mqrpc_workers{" Q "} 2\n"));
    assert_non_null(strstr(text, "mqrpc_max_queue{" Q "} 7\n"));
    assert_non_null(strstr(text, "# TYPE mqrpc_requests_total counter\n"));
#undef Q
    free(text);
}

/* ------------------------------------------------------------ trace */

#define T_ID "4bf92f3577b34da6a3ce929d0e0e4736"
#define P_ID "00f067aa0ba902b7"

static void traceparent_parsing(void **state)
{
    static const char *const good[] = {
        "00-" T_ID "-" P_ID "-01",
        "00-" T_ID "-" P_ID "-00",
        "00-" T_ID "-" P_ID "-ff", /* unknown flags are carried */
        "01-" T_ID "-" P_ID "-01", /* a later version, same fields */
        "cc-" T_ID "-" P_ID "-01-what-the-future-adds",
    };
    static const char *const bad[] = {
        "",
        "00",
        "00-" T_ID "-" P_ID,                         /* no flags */
        "00-" T_ID "-" P_ID "-1",                    /* short flags */
        "00-" T_ID "-" P_ID "-01-",                  /* 00 has no more */
        "00-" T_ID "-" P_ID "-01 ",
        "00-00000000000000000000000000000000-" P_ID "-01", /* zero trace */
        "00-" T_ID "-0000000000000000-01",           /* zero parent */
        "ff-" T_ID "-" P_ID "-01",                   /* forbidden version */
        "0g-" T_ID "-" P_ID "-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-" P_ID "-01", /* uppercase */
        "00-" T_ID "-00F067AA0BA902B7-01",
        "00_" T_ID "-" P_ID "-01",
        "00-" T_ID "x" P_ID "-01",
        "00-" T_ID "-" P_ID "x01",
        "01-" T_ID "-" P_ID "-01x",                  /* later: '-' after */
        "00-4bf92f3577b34da6a3ce929d0e0e473-" P_ID "-01", /* 31 digits */
    };
    mqr_trace_ids ids;

    (void)state;
    for (size_t i = 0; i < sizeof good / sizeof *good; i++) {
        assert_true(mqrpc_traceparent_valid(good[i]));
        assert_true(mqr_traceparent_parse(good[i], strlen(good[i]), &ids));
        assert_string_equal(ids.trace_id, T_ID);
        assert_string_equal(ids.span_id, P_ID);
    }
    assert_true(mqr_traceparent_parse(good[2], strlen(good[2]), &ids));
    assert_string_equal(ids.flags, "ff");
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        if (mqrpc_traceparent_valid(bad[i]))
            fail_msg("accepted \"%s\"", bad[i]);
        assert_false(mqr_traceparent_parse(bad[i], strlen(bad[i]), NULL));
    }
    assert_false(mqrpc_traceparent_valid(NULL));
    assert_false(mqr_traceparent_parse(NULL, 0, NULL));
    /* Not NUL-terminated, as a header is: the length decides. */
    assert_true(mqr_traceparent_parse("00-" T_ID "-" P_ID "-01xyz", 55, NULL));
}

static void traceparent_formatting_and_tracestate(void **state)
{
    char tp[MQRPC_TRACEPARENT_LEN + 1], big[MQRPC_TRACESTATE_MAX + 2];

    (void)state;
    mqr_traceparent_format(tp, T_ID, P_ID, "01");
    assert_string_equal(tp, "00-" T_ID "-" P_ID "-01");
    assert_true(mqr_tracestate_ok("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
                                  39));
    assert_false(mqr_tracestate_ok("", 0));
    assert_false(mqr_tracestate_ok("a=\n", 3));
    assert_false(mqr_tracestate_ok("a=\xc3\xa9", 4));
    memset(big, 'a', sizeof big);
    assert_true(mqr_tracestate_ok(big, MQRPC_TRACESTATE_MAX));
    assert_false(mqr_tracestate_ok(big, MQRPC_TRACESTATE_MAX + 1));
}

static void trace_start_continues_or_begins(void **state)
{
    mqr_trace a, b, c;
    char hex[33];

    (void)state;
    mqr_trace_random_hex(hex, 16);
    assert_int_equal(strlen(hex), 32);
    assert_int_equal(strspn(hex, "0123456789abcdef"), 32);

    /* Continued: the caller's trace and flags, its span as the parent, a
     * new span of ours. */
    mqr_trace_start(&a, mqr_cstr("00-" T_ID "-" P_ID "-00"));
    assert_string_equal(a.trace_id, T_ID);
    assert_string_equal(a.parent_id, P_ID);
    assert_string_equal(a.flags, "00");
    assert_string_not_equal(a.span_id, P_ID);
    assert_true(mqrpc_traceparent_valid(a.traceparent));
    assert_memory_equal(a.traceparent, "00-" T_ID "-", 36);
    assert_memory_equal(a.traceparent + 36, a.span_id, 16);
    assert_string_equal(a.traceparent + 52, "-00");

    /* Missing or invalid: a new trace, sampled, no parent. */
    mqr_trace_start(&b, mqr_cstr(""));
    mqr_trace_start(&c, mqr_cstr("00-" T_ID "-" P_ID));
    assert_true(mqrpc_traceparent_valid(b.traceparent));
    assert_true(mqrpc_traceparent_valid(c.traceparent));
    assert_string_equal(b.parent_id, "");
    assert_string_equal(b.flags, "01");
    assert_string_not_equal(b.trace_id, c.trace_id);
    assert_string_not_equal(c.trace_id, T_ID);
}

static mqrpc_log_record last_rec;
static char last_msg[256], last_cid[64];

static void save_record(const mqrpc_log_record *rec, void *arg)
{
    (void)arg;
    last_rec = *rec;
    snprintf(last_msg, sizeof last_msg, "%s", rec->msg);
    snprintf(last_cid, sizeof last_cid, "%s",
             rec->correlation_id ? rec->correlation_id : "(null)");
}

static void save_line(mqrpc_log_level level, const char *line, void *arg)
{
    (void)level;
    (void)arg;
    snprintf(last_msg, sizeof last_msg, "%s", line);
}

static void request_log_lines_carry_their_fields(void **state)
{
    mqr_logger lg = {.record_fn = save_record};
    mqr_req_fields f = {.queue = "service_x",
                        .correlation_id = "abc-1",
                        .trace_id = T_ID,
                        .span_id = P_ID,
                        .code = "ok",
                        .duration_ms = 1.5};

    (void)state;
    mqr_log_req(&lg, MQRPC_LOG_DEBUG, &f, "answered %s", "abc-1");
    assert_true(last_rec.size >= sizeof last_rec);
    assert_int_equal(last_rec.level, MQRPC_LOG_DEBUG);
    assert_string_equal(last_msg, "answered abc-1"); /* ids apart */
    assert_string_equal(last_cid, "abc-1");
    assert_string_equal(last_rec.queue, "service_x");
    assert_string_equal(last_rec.trace_id, T_ID);
    assert_string_equal(last_rec.span_id, P_ID);
    assert_string_equal(last_rec.code, "ok");
    assert_true(last_rec.duration_ms == 1.5);

    mqr_log(&lg, MQRPC_LOG_WARN, "connection lost");
    assert_string_equal(last_msg, "connection lost");
    assert_null(last_rec.trace_id);
    assert_null(last_rec.queue);
    assert_true(last_rec.duration_ms < 0);

    /* A text log function gets the ids at the end of the line. */
    lg = (mqr_logger){.fn = save_line};
    mqr_log_req(&lg, MQRPC_LOG_DEBUG, &f, "answered %s", "abc-1");
    assert_string_equal(last_msg,
                        "answered abc-1 trace_id=" T_ID " span_id=" P_ID);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(every_error_has_a_name_and_a_sentence),
        cmocka_unit_test(backoff_jitters_and_caps),
        cmocka_unit_test(traceparent_parsing),
        cmocka_unit_test(traceparent_formatting_and_tracestate),
        cmocka_unit_test(trace_start_continues_or_begins),
        cmocka_unit_test(request_log_lines_carry_their_fields),
        cmocka_unit_test(fault_set_formats_and_returns_null),
        cmocka_unit_test(decode_request_accepts_objects),
        cmocka_unit_test(decode_request_rejects_bad_bodies),
        cmocka_unit_test(decode_request_depth_limit),
        cmocka_unit_test(decode_request_refuses_deep_nesting_early),
        cmocka_unit_test(decode_request_string_limit),
        cmocka_unit_test(decode_request_quotes_keys_safely),
        cmocka_unit_test(decode_request_cuts_long_paths),
        cmocka_unit_test(decode_request_rejects_invalid_utf8),
        cmocka_unit_test(decode_request_defaults_when_zero),
        cmocka_unit_test(encode_matches_what_the_seed_sends),
        cmocka_unit_test(faults_round_trip),
        cmocka_unit_test(decode_reply_cases),
        cmocka_unit_test(url_parse_defaults_and_vhost),
        cmocka_unit_test(url_parse_rejects_and_hides_the_password),
        cmocka_unit_test(url_parse_edge_cases),
        cmocka_unit_test(url_redact),
        cmocka_unit_test(default_url_precedence),
        cmocka_unit_test(url_file_owner_only),
        cmocka_unit_test(url_tls_parameters),
        cmocka_unit_test(url_query_error_hides_password),
        cmocka_unit_test(url_plaintext_remote),
        cmocka_unit_test(url_list_entries),
        cmocka_unit_test(url_list_check_names_the_entry),
        cmocka_unit_test(url_list_redact_and_plaintext),
        cmocka_unit_test(url_list_shuffle),
        cmocka_unit_test(url_list_attempt_policy),
        cmocka_unit_test(cli_caller_options),
        cmocka_unit_test(cli_service_options),
        cmocka_unit_test(cli_service_limit_options),
        cmocka_unit_test(cli_extra_short_and_flags),
        cmocka_unit_test(cli_options_after_operands),
        cmocka_unit_test(exit_codes_are_the_documented_ones),
        cmocka_unit_test(metric_codes_and_buckets),
        cmocka_unit_test(metrics_text_of_a_service),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
