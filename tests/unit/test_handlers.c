/*
 * Unit tests of the four service handlers, without a broker: each test
 * feeds a request as a client would send it and checks what that client
 * would see, the exact JSON (and its type) or the error code and message.
 *
 * Usage: test_handlers [soma|media|info|busca]; no argument runs all.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <float.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include "busca.h"
#include "info.h"
#include "media.h"
#include "soma.h"

/* ------------------------------------------------------------- helpers */

/* call parses request_text as the service runtime would and runs fn. */
static json_t *call(mqrpc_handler_fn fn, void *arg, const char *request_text,
                    mqrpc_fault *fault)
{
    json_error_t jerr;
    json_t *request = json_loads(request_text, 0, &jerr);
    json_t *result;

    if (request == NULL)
        fail_msg("bad test request %s: %s", request_text, jerr.text);
    memset(fault, 0, sizeof *fault);
    result = fn(request, fault, arg);
    json_decref(request);
    return result;
}

/* expect_result checks the result's JSON type and its text as json_dumps
 * writes it, which is what the command-line client prints. */
static void expect_result(mqrpc_handler_fn fn, void *arg, const char *request,
                          json_type type, const char *expected)
{
    mqrpc_fault fault;
    json_t *result = call(fn, arg, request, &fault);
    char *text;

    if (result == NULL)
        fail_msg("%s failed: %s: %s", request, fault.code, fault.message);
    text = json_dumps(result, JSON_ENCODE_ANY);
    assert_non_null(text);
    assert_string_equal(text, expected);
    assert_int_equal(json_typeof(result), type);
    free(text);
    json_decref(result);
}

static void expect_fault(mqrpc_handler_fn fn, void *arg, const char *request,
                         const char *code, const char *message)
{
    mqrpc_fault fault;
    json_t *result = call(fn, arg, request, &fault);

    if (result != NULL) {
        char *text = json_dumps(result, JSON_ENCODE_ANY);

        fail_msg("%s succeeded with %s, expected %s", request, text, code);
    }
    assert_string_equal(fault.code, code);
    assert_string_equal(fault.message, message);
}

/* ---------------------------------------------------------------- soma */

static void soma_integers_stay_integers(void **state)
{
    (void)state;
    expect_result(soma_handle, NULL, "{\"a\": 10, \"b\": 5}", JSON_INTEGER,
                  "15");
    expect_result(soma_handle, NULL, "{\"a\": -7, \"b\": 7}", JSON_INTEGER,
                  "0");
    expect_result(soma_handle, NULL, "{\"a\": -3, \"b\": -4}", JSON_INTEGER,
                  "-7");
}

static void soma_real_operand_gives_real(void **state)
{
    (void)state;
    expect_result(soma_handle, NULL, "{\"a\": 1.5, \"b\": 2}", JSON_REAL,
                  "3.5");
    expect_result(soma_handle, NULL, "{\"a\": 10, \"b\": 5.0}", JSON_REAL,
                  "15.0");
    expect_result(soma_handle, NULL, "{\"a\": 0.25, \"b\": 0.5}", JSON_REAL,
                  "0.75");
}

static void soma_ignores_extra_fields(void **state)
{
    (void)state;
    expect_result(soma_handle, NULL,
                  "{\"a\": 1, \"b\": 2, \"c\": \"x\", \"op\": null}",
                  JSON_INTEGER, "3");
}

static void soma_int64_limits(void **state)
{
    (void)state;
    expect_result(soma_handle, NULL, "{\"a\": 9223372036854775807, \"b\": 0}",
                  JSON_INTEGER, "9223372036854775807");
    expect_result(soma_handle, NULL, "{\"a\": 9223372036854775806, \"b\": 1}",
                  JSON_INTEGER, "9223372036854775807");
    expect_result(soma_handle, NULL, "{\"a\": -9223372036854775807, \"b\": -1}",
                  JSON_INTEGER, "-9223372036854775808");
    expect_fault(soma_handle, NULL, "{\"a\": 9223372036854775807, \"b\": 1}",
                 MQRPC_BAD_REQUEST, "a + b overflows a 64-bit integer");
    expect_fault(soma_handle, NULL, "{\"a\": -9223372036854775808, \"b\": -1}",
                 MQRPC_BAD_REQUEST, "a + b overflows a 64-bit integer");
}

static void soma_real_overflow(void **state)
{
    (void)state;
    expect_fault(soma_handle, NULL, "{\"a\": 1e308, \"b\": 1e308}",
                 MQRPC_BAD_REQUEST, "a + b is too large for a real number");
    expect_fault(soma_handle, NULL, "{\"a\": -1e308, \"b\": -1e308}",
                 MQRPC_BAD_REQUEST, "a + b is too large for a real number");
}

static void soma_missing_field(void **state)
{
    (void)state;
    expect_fault(soma_handle, NULL, "{}", MQRPC_BAD_REQUEST,
                 "field \"a\" is missing");
    expect_fault(soma_handle, NULL, "{\"a\": 1}", MQRPC_BAD_REQUEST,
                 "field \"b\" is missing");
    expect_fault(soma_handle, NULL, "{\"b\": 1}", MQRPC_BAD_REQUEST,
                 "field \"a\" is missing");
}

static void soma_non_numbers(void **state)
{
    (void)state;
    expect_fault(soma_handle, NULL, "{\"a\": \"10\", \"b\": 5}",
                 MQRPC_BAD_REQUEST, "field \"a\" must be a number, got string");
    expect_fault(soma_handle, NULL, "{\"a\": 10, \"b\": true}",
                 MQRPC_BAD_REQUEST,
                 "field \"b\" must be a number, got boolean");
    expect_fault(soma_handle, NULL, "{\"a\": false, \"b\": 1}",
                 MQRPC_BAD_REQUEST,
                 "field \"a\" must be a number, got boolean");
    expect_fault(soma_handle, NULL, "{\"a\": null, \"b\": 1}",
                 MQRPC_BAD_REQUEST, "field \"a\" must be a number, got null");
    expect_fault(soma_handle, NULL, "{\"a\": 1, \"b\": [1]}", MQRPC_BAD_REQUEST,
                 "field \"b\" must be a number, got array");
    expect_fault(soma_handle, NULL, "{\"a\": 1, \"b\": {}}", MQRPC_BAD_REQUEST,
                 "field \"b\" must be a number, got object");
}

/* --------------------------------------------------------------- media */

static void media_of_integers_is_real(void **state)
{
    (void)state;
    expect_result(media_handle, NULL, "{\"numeros\": [10, 20, 30, 40]}",
                  JSON_REAL, "25.0");
    expect_result(media_handle, NULL, "{\"numeros\": [7]}", JSON_REAL, "7.0");
    expect_result(media_handle, NULL, "{\"numeros\": [1, 2]}", JSON_REAL,
                  "1.5");
    expect_result(media_handle, NULL, "{\"numeros\": [-4, 4]}", JSON_REAL,
                  "0.0");
}

static void media_mixed_and_reals(void **state)
{
    (void)state;
    expect_result(media_handle, NULL, "{\"numeros\": [1, 2.5]}", JSON_REAL,
                  "1.75");
    expect_result(media_handle, NULL,
                  "{\"numeros\": [0.5, 0.25, 0.25], \"extra\": 1}", JSON_REAL,
                  "0.33333333333333331");
}

static void media_large_values(void **state)
{
    mqrpc_fault fault;
    json_t *r;

    (void)state;
    /* Integers near INT64_MAX must not wrap while summed. */
    r = call(media_handle, NULL,
             "{\"numeros\": [9223372036854775807, 9223372036854775807]}",
             &fault);
    assert_non_null(r);
    assert_true(json_is_real(r));
    assert_true(json_real_value(r) == (double)INT64_MAX);
    json_decref(r);

    /* Two DBL_MAX sum past DBL_MAX; a wider long double still gives the
     * right mean, otherwise the overflow must be an error, not Infinity. */
    r = call(media_handle, NULL,
             "{\"numeros\": [1.7976931348623157e308, 1.7976931348623157e308]}",
             &fault);
    if (LDBL_MAX_EXP > DBL_MAX_EXP) {
        assert_non_null(r);
        assert_true(json_real_value(r) == DBL_MAX);
        json_decref(r);
    } else {
        assert_null(r);
        assert_string_equal(fault.code, MQRPC_BAD_REQUEST);
    }
}

static void media_bad_lists(void **state)
{
    (void)state;
    expect_fault(media_handle, NULL, "{}", MQRPC_BAD_REQUEST,
                 "field \"numeros\" is missing");
    expect_fault(media_handle, NULL, "{\"numeros\": \"10 20\"}",
                 MQRPC_BAD_REQUEST,
                 "field \"numeros\" must be an array, got string");
    expect_fault(media_handle, NULL, "{\"numeros\": 10}", MQRPC_BAD_REQUEST,
                 "field \"numeros\" must be an array, got integer");
    expect_fault(media_handle, NULL, "{\"numeros\": {\"x\": 1}}",
                 MQRPC_BAD_REQUEST,
                 "field \"numeros\" must be an array, got object");
    expect_fault(media_handle, NULL, "{\"numeros\": []}", MQRPC_BAD_REQUEST,
                 "numeros must not be empty");
}

static void media_bad_elements(void **state)
{
    (void)state;
    expect_fault(media_handle, NULL, "{\"numeros\": [1, \"2\", 3]}",
                 MQRPC_BAD_REQUEST, "numeros[1] must be a number, got string");
    expect_fault(media_handle, NULL, "{\"numeros\": [true]}", MQRPC_BAD_REQUEST,
                 "numeros[0] must be a number, got boolean");
    expect_fault(media_handle, NULL, "{\"numeros\": [1, 2, null]}",
                 MQRPC_BAD_REQUEST, "numeros[2] must be a number, got null");
    expect_fault(media_handle, NULL, "{\"numeros\": [[1]]}", MQRPC_BAD_REQUEST,
                 "numeros[0] must be a number, got array");
}

/* numeros_of returns {"numeros": [1, 1, ...]} with n elements (malloc'd). */
static char *numeros_of(size_t n)
{
    char *s = malloc(16 + 3 * n), *p;

    assert_non_null(s);
    p = s + sprintf(s, "{\"numeros\": [");
    for (size_t i = 0; i < n; i++)
        p += sprintf(p, i ? ", 1" : "1");
    strcpy(p, "]}");
    return s;
}

static void media_item_limit(void **state)
{
    const media_opts three = {.max_items = 3};
    char *s;

    (void)state;
    expect_result(media_handle, (void *)&three, "{\"numeros\": [1, 2, 3]}",
                  JSON_REAL, "2.0");
    expect_fault(media_handle, (void *)&three, "{\"numeros\": [1, 2, 3, 4]}",
                 MQRPC_BAD_REQUEST, "numeros has 4 elements; the limit is 3");
    /* Counted before the elements are looked at. */
    expect_fault(media_handle, (void *)&three,
                 "{\"numeros\": [1, 2, 3, \"x\"]}", MQRPC_BAD_REQUEST,
                 "numeros has 4 elements; the limit is 3");
    /* NULL, or 0, means MEDIA_DEFAULT_MAX_ITEMS. */
    assert_int_equal(MEDIA_DEFAULT_MAX_ITEMS, 100000);
    s = numeros_of(MEDIA_DEFAULT_MAX_ITEMS);
    expect_result(media_handle, NULL, s, JSON_REAL, "1.0");
    expect_result(media_handle, &(media_opts){0}, s, JSON_REAL, "1.0");
    free(s);
    s = numeros_of(MEDIA_DEFAULT_MAX_ITEMS + 1);
    expect_fault(media_handle, NULL, s, MQRPC_BAD_REQUEST,
                 "numeros has 100001 elements; the limit is 100000");
    free(s);
}

/* ---------------------------------------------------------------- info */

static void check_info(json_t *r, const char *instancia)
{
    static const char *const keys[] = {"so", "versao", "hostname", "pid",
                                       "instancia"};
    struct utsname uts;
    char host[256] = "";
    const char *key;
    json_t *value;
    size_t i = 0;

    assert_non_null(r);
    assert_true(json_is_object(r));
    assert_int_equal(json_object_size(r), 5);
    /* Clients print the object as is, so the order is part of the answer. */
    json_object_foreach (r, key, value) {
        assert_string_equal(key, keys[i]);
        i++;
    }
    assert_int_equal(uname(&uts), 0);
    assert_int_equal(gethostname(host, sizeof host - 1), 0);
    assert_string_equal(json_string_value(json_object_get(r, "so")),
                        uts.sysname);
    assert_string_equal(json_string_value(json_object_get(r, "versao")),
                        uts.release);
    assert_true(json_is_string(json_object_get(r, "hostname")));
    assert_string_equal(json_string_value(json_object_get(r, "hostname")),
                        host);
    assert_true(json_is_integer(json_object_get(r, "pid")));
    assert_int_equal(json_integer_value(json_object_get(r, "pid")), getpid());
    assert_string_equal(json_string_value(json_object_get(r, "instancia")),
                        instancia);
}

static void info_describes_host(void **state)
{
    char instance[] = "service_info@host:42";
    mqrpc_fault fault;
    json_t *r;

    (void)state;
    r = call(info_handle, instance, "{}", &fault);
    check_info(r, instance);
    json_decref(r);
    /* Whatever the caller sends is ignored. */
    r = call(info_handle, instance, "{\"x\": [1, 2], \"so\": \"nope\"}",
             &fault);
    check_info(r, instance);
    json_decref(r);
}

static void info_without_instance(void **state)
{
    mqrpc_fault fault;
    json_t *r;

    (void)state;
    r = call(info_handle, NULL, "{}", &fault);
    check_info(r, "unknown");
    json_decref(r);
}

/* --------------------------------------------------------------- busca */

static const char joao_answer[] = "{\"idade\": 22, \"cidade\": \"São Paulo\"}";

/* A temporary directory per test, removed with everything in it. */
typedef struct {
    char dir[64];
} tmp_fixture;

static int remove_tree(const char *path)
{
    struct stat st;
    DIR *d;
    struct dirent *e;

    if (lstat(path, &st) < 0)
        return -1;
    if (!S_ISDIR(st.st_mode))
        return unlink(path);
    if ((d = opendir(path)) == NULL)
        return -1;
    while ((e = readdir(d)) != NULL) {
        char child[1024];

        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        snprintf(child, sizeof child, "%s/%s", path, e->d_name);
        remove_tree(child);
    }
    closedir(d);
    return rmdir(path);
}

static int tmp_setup(void **state)
{
    tmp_fixture *f = calloc(1, sizeof *f);

    if (f == NULL)
        return -1;
    snprintf(f->dir, sizeof f->dir, "/tmp/test_busca.XXXXXX");
    if (mkdtemp(f->dir) == NULL) {
        free(f);
        return -1;
    }
    *state = f;
    return 0;
}

static int tmp_teardown(void **state)
{
    tmp_fixture *f = *state;
    int rc = remove_tree(f->dir);

    free(f);
    return rc;
}

/* path_in writes dir/name into buf and returns buf. */
static const char *path_in(const tmp_fixture *f, const char *name, char *buf,
                           size_t len)
{
    snprintf(buf, len, "%s/%s", f->dir, name);
    return buf;
}

static void write_file(const char *path, const char *content)
{
    FILE *fp = fopen(path, "w");

    assert_non_null(fp);
    assert_int_equal(fputs(content, fp) >= 0, 1);
    assert_int_equal(fclose(fp), 0);
}

/* sql_int runs a one-number query on the database file behind busca's back,
 * to see what busca_open really stored. */
static long long sql_int(const char *db_path, const char *sql)
{
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    long long v;

    assert_int_equal(sqlite3_open_v2(db_path, &db, SQLITE_OPEN_READWRITE, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    sqlite3_close(db);
    return v;
}

static void sql_exec(const char *db_path, const char *sql)
{
    sqlite3 *db = NULL;

    assert_int_equal(sqlite3_open_v2(db_path, &db, SQLITE_OPEN_READWRITE, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_exec(db, sql, NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(db);
}

static size_t shipped_people(void)
{
    json_t *people = json_load_file(BUSCA_DATA_FILE, 0, NULL);
    size_t n;

    assert_non_null(people);
    n = json_array_size(people);
    json_decref(people);
    return n;
}

/* str_or_null: s for a message; data_path may be NULL on purpose, and %s of
 * NULL is undefined behaviour (glibc prints "(null)", gcc -O2 rejects it). */
static const char *str_or_null(const char *s)
{
    return s ? s : "(null)";
}

static busca_db *open_ok(const char *db_path, const char *data_path)
{
    char err[512] = "";
    busca_db *db = busca_open(db_path, data_path, err, sizeof err);

    if (db == NULL)
        fail_msg("busca_open(%s, %s): %s", str_or_null(db_path),
                 str_or_null(data_path), err);
    return db;
}

/* open_fails expects busca_open to fail with exactly the message want. */
static void open_fails(const char *db_path, const char *data_path,
                       const char *want)
{
    char err[512] = "";
    busca_db *db = busca_open(db_path, data_path, err, sizeof err);

    if (db != NULL) {
        busca_close(db);
        fail_msg("busca_open(%s, %s) succeeded", str_or_null(db_path),
                 str_or_null(data_path));
    }
    assert_string_equal(err, want);
}

static void busca_key_folds(void **state)
{
    static const struct {
        const char *in, *out;
    } cases[] = {
        {"João", "joao"},
        {"JOAO", "joao"},
        {"  JOÃO \t\n", "joao"},
        {"Conceição", "conceicao"},
        {"ÂNGELA", "angela"},
        {"José da Silva", "jose da silva"},
        {"ÀÁÂÃÄÅÇÈÉÊËÌÍÎÏÑÒÓÔÕÖÙÚÛÜÝ", "aaaaaaceeeeiiiinooooouuuuy"},
        {"àáâãäåçèéêëìíîïñòóôõöùúûüýÿ", "aaaaaaceeeeiiiinooooouuuuyy"},
        {"Æsir Øre Straße", "aesir ore strasse"},
        {"3 × 4 ÷ 2", "3 × 4 ÷ 2"},
        {"Łódź 東京", "Łodź 東京"},
        {"", ""},
        {" \t ", ""},
    };
    char out[64];
    size_t i;

    (void)state;
    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        assert_int_equal(busca_key(cases[i].in, out, sizeof out), 0);
        assert_string_equal(out, cases[i].out);
    }
}

static void busca_key_rejects(void **state)
{
    static const char *const invalid[] = {
        "jo\xC3",           /* truncated sequence */
        "\xC3\xA3\xA3",     /* stray continuation byte */
        "\xC0\xAF",         /* overlong "/" */
        "\xE0\x80\xAF",     /* overlong "/" in three bytes */
        "\xED\xA0\x80",     /* UTF-16 surrogate */
        "\xF4\x90\x80\x80", /* beyond U+10FFFF */
        "\xFF",
    };
    char out[64];
    size_t i;

    (void)state;
    for (i = 0; i < sizeof invalid / sizeof invalid[0]; i++)
        assert_int_equal(busca_key(invalid[i], out, sizeof out), -1);
    /* out must hold the key and its terminator. */
    assert_int_equal(busca_key("João", out, 4), -1);
    assert_int_equal(busca_key("João", out, 5), 0);
    assert_string_equal(out, "joao");
    assert_int_equal(busca_key("x", out, 0), -1);
}

static void busca_finds_shipped_people(void **state)
{
    char db_path[128];
    busca_db *db;

    /* Two missing directory levels: busca_open creates them. */
    path_in(*state, "var/busca/pessoas.db", db_path, sizeof db_path);
    db = open_ok(db_path, BUSCA_DATA_FILE);
    assert_int_equal(sql_int(db_path, "SELECT count(*) FROM pessoas"),
                     shipped_people());

    expect_result(busca_handle, db, "{\"nome\": \"joao\"}", JSON_OBJECT,
                  joao_answer);
    expect_result(busca_handle, db, "{\"nome\": \"João\"}", JSON_OBJECT,
                  joao_answer);
    expect_result(busca_handle, db, "{\"nome\": \"JOAO\"}", JSON_OBJECT,
                  joao_answer);
    expect_result(busca_handle, db, "{\"nome\": \"  joao \"}", JSON_OBJECT,
                  joao_answer);
    expect_result(busca_handle, db, "{\"nome\": \"Jo\\u00e3o\", \"x\": 1}",
                  JSON_OBJECT, joao_answer);
    expect_result(busca_handle, db, "{\"nome\": \"CONCEICAO\"}", JSON_OBJECT,
                  "{\"idade\": 61, \"cidade\": \"Salvador\"}");
    expect_result(busca_handle, db, "{\"nome\": \"angela\"}", JSON_OBJECT,
                  "{\"idade\": 44, \"cidade\": \"Curitiba\"}");
    busca_close(db);
}

static void busca_unknown_and_bad_names(void **state)
{
    char db_path[128];
    mqrpc_fault fault;
    json_t *req, *r;
    busca_db *db;

    db = open_ok(path_in(*state, "p.db", db_path, sizeof db_path),
                 BUSCA_DATA_FILE);
    expect_fault(busca_handle, db, "{\"nome\": \"maria\"}", MQRPC_NOT_FOUND,
                 "no person named \"maria\"");
    expect_fault(busca_handle, db, "{\"nome\": \" Maria \"}", MQRPC_NOT_FOUND,
                 "no person named \" Maria \"");
    expect_fault(busca_handle, db, "{}", MQRPC_BAD_REQUEST,
                 "field \"nome\" is missing");
    expect_fault(busca_handle, db, "{\"nome\": 42}", MQRPC_BAD_REQUEST,
                 "field \"nome\" must be a string, got integer");
    expect_fault(busca_handle, db, "{\"nome\": null}", MQRPC_BAD_REQUEST,
                 "field \"nome\" must be a string, got null");
    expect_fault(busca_handle, db, "{\"nome\": [\"joao\"]}", MQRPC_BAD_REQUEST,
                 "field \"nome\" must be a string, got array");
    expect_fault(busca_handle, db, "{\"nome\": \"\"}", MQRPC_BAD_REQUEST,
                 "field \"nome\" must not be empty");
    expect_fault(busca_handle, db, "{\"nome\": \" \\t \"}", MQRPC_BAD_REQUEST,
                 "field \"nome\" must not be empty");

    /* Only a JSON_ALLOW_NUL decoder produces this; it must not match "jo". */
    req = json_pack("{s:s%}", "nome", "jo\0ao", (size_t)5);
    assert_non_null(req);
    memset(&fault, 0, sizeof fault);
    r = busca_handle(req, &fault, db);
    assert_null(r);
    assert_string_equal(fault.code, MQRPC_BAD_REQUEST);
    assert_string_equal(fault.message, "field \"nome\" must not contain NUL");
    json_decref(req);

    /* The handle still answers after all those failures. */
    expect_result(busca_handle, db, "{\"nome\": \"joao\"}", JSON_OBJECT,
                  joao_answer);
    busca_close(db);

    expect_fault(busca_handle, NULL, "{\"nome\": \"joao\"}", MQRPC_INTERNAL,
                 "the people database is not open");
    busca_close(NULL);
}

static void busca_reopen_does_not_reimport(void **state)
{
    char db_path[128], a[128], b[128], missing[128];
    busca_db *db;

    path_in(*state, "p.db", db_path, sizeof db_path);
    path_in(*state, "a.json", a, sizeof a);
    path_in(*state, "b.json", b, sizeof b);
    path_in(*state, "missing.json", missing, sizeof missing);
    write_file(a, "[{\"nome\": \"Ana\", \"idade\": 1, \"cidade\": \"A\"},\n"
                  " {\"nome\": \"Bia\", \"idade\": 2, \"cidade\": \"B\"}]\n");
    write_file(b, "[{\"nome\": \"Caio\", \"idade\": 3, \"cidade\": \"C\"}]\n");

    busca_close(open_ok(db_path, a));
    assert_int_equal(sql_int(db_path, "SELECT count(*) FROM pessoas"), 2);

    /* A filled database is used as is: the data file is not even read. */
    db = open_ok(db_path, missing);
    busca_close(db);
    db = open_ok(db_path, b);
    assert_int_equal(sql_int(db_path, "SELECT count(*) FROM pessoas"), 2);
    expect_result(busca_handle, db, "{\"nome\": \"bia\"}", JSON_OBJECT,
                  "{\"idade\": 2, \"cidade\": \"B\"}");
    expect_fault(busca_handle, db, "{\"nome\": \"Caio\"}", MQRPC_NOT_FOUND,
                 "no person named \"Caio\"");
    busca_close(db);

    /* An emptied table is filled again. */
    sql_exec(db_path, "DELETE FROM pessoas");
    db = open_ok(db_path, b);
    assert_int_equal(sql_int(db_path, "SELECT count(*) FROM pessoas"), 1);
    expect_result(busca_handle, db, "{\"nome\": \"caio\"}", JSON_OBJECT,
                  "{\"idade\": 3, \"cidade\": \"C\"}");
    busca_close(db);
}

static void busca_rejects_duplicate_people(void **state)
{
    char db_path[128], data[128], want[512];
    busca_db *db;

    path_in(*state, "p.db", db_path, sizeof db_path);
    path_in(*state, "dup.json", data, sizeof data);
    write_file(data,
               "[{\"nome\": \"José\", \"idade\": 1, \"cidade\": \"A\"},\n"
               " {\"nome\": \"Ana\", \"idade\": 2, \"cidade\": \"B\"},\n"
               " {\"nome\": \"JOSE \", \"idade\": 3, \"cidade\": \"C\"}]\n");
    snprintf(want, sizeof want,
             "data file %s: duplicate person \"JOSE \" (same name as "
             "\"José\")",
             data);
    open_fails(db_path, data, want);

    /* Nothing of the failed import stays behind. */
    write_file(data, "[{\"nome\": \"Rui\", \"idade\": 9, \"cidade\": \"R\"}]");
    db = open_ok(db_path, data);
    assert_int_equal(sql_int(db_path, "SELECT count(*) FROM pessoas"), 1);
    busca_close(db);
}

static void busca_rejects_bad_data_files(void **state)
{
    char db_path[128], data[128], want[512];

    path_in(*state, "p.db", db_path, sizeof db_path);
    path_in(*state, "data.json", data, sizeof data);

    snprintf(want, sizeof want,
             "cannot read data file %s: No such file or directory", data);
    open_fails(db_path, data, want);

    snprintf(want, sizeof want, "cannot read data file %s: Is a directory",
             "/tmp");
    open_fails(db_path, "/tmp", want);

    write_file(data, "[\n {\"nome\": \"Ana\", \"idade\": 1, \"cidade\": \"A\"},"
                     "\n {\"nome\": \"Bia\" \"idade\": 2}\n]\n");
    snprintf(want, sizeof want,
             "data file %s: line 3: '}' expected near '\"idade\"'", data);
    open_fails(db_path, data, want);

    write_file(data, "{\"nome\": \"Ana\", \"idade\": 1, \"cidade\": \"A\"}");
    snprintf(want, sizeof want,
             "data file %s: expected a non-empty JSON array of people", data);
    open_fails(db_path, data, want);
    write_file(data, "[]");
    open_fails(db_path, data, want);

    write_file(data, "[{\"nome\": \"Ana\", \"idade\": 1, \"cidade\": \"A\"},"
                     " {\"nome\": \"Bia\", \"idade\": \"2\", \"cidade\": "
                     "\"B\"}]");
    snprintf(want, sizeof want,
             "data file %s: person 2: Expected integer, got string", data);
    open_fails(db_path, data, want);

    write_file(data, "[{\"nome\": \"Ana\", \"idade\": -1, \"cidade\": \"A\"}]");
    snprintf(want, sizeof want,
             "data file %s: person 1: idade must not be negative", data);
    open_fails(db_path, data, want);

    write_file(data, "[{\"nome\": \" \", \"idade\": 1, \"cidade\": \"A\"}]");
    snprintf(want, sizeof want, "data file %s: person 1: nome is empty", data);
    open_fails(db_path, data, want);

    open_fails(db_path, NULL,
               "the database is empty and no data file was given");
    open_fails("", BUSCA_DATA_FILE, "no database path given");
}

static void busca_concurrent_start_imports_once(void **state)
{
    enum { N = 4 };
    char db_path[128];
    pid_t pids[N];
    int i, status;

    path_in(*state, "shared/p.db", db_path, sizeof db_path);
    for (i = 0; i < N; i++) {
        pids[i] = fork();
        assert_true(pids[i] >= 0);
        if (pids[i] == 0) {
            char err[512];
            busca_db *db =
                busca_open(db_path, BUSCA_DATA_FILE, err, sizeof err);

            if (db == NULL)
                fprintf(stderr, "child %d: %s\n", i, err);
            busca_close(db);
            _exit(db != NULL ? 0 : 1);
        }
    }
    for (i = 0; i < N; i++) {
        assert_int_equal(waitpid(pids[i], &status, 0), pids[i]);
        assert_true(WIFEXITED(status));
        assert_int_equal(WEXITSTATUS(status), 0);
    }
    assert_int_equal(sql_int(db_path, "SELECT count(*) FROM pessoas"),
                     shipped_people());
}

/* ---------------------------------------------------------------- main */

int main(int argc, char **argv)
{
    static const struct CMUnitTest soma_tests[] = {
        cmocka_unit_test(soma_integers_stay_integers),
        cmocka_unit_test(soma_real_operand_gives_real),
        cmocka_unit_test(soma_ignores_extra_fields),
        cmocka_unit_test(soma_int64_limits),
        cmocka_unit_test(soma_real_overflow),
        cmocka_unit_test(soma_missing_field),
        cmocka_unit_test(soma_non_numbers),
    };
    static const struct CMUnitTest media_tests[] = {
        cmocka_unit_test(media_of_integers_is_real),
        cmocka_unit_test(media_mixed_and_reals),
        cmocka_unit_test(media_large_values),
        cmocka_unit_test(media_bad_lists),
        cmocka_unit_test(media_bad_elements),
        cmocka_unit_test(media_item_limit),
    };
    static const struct CMUnitTest info_tests[] = {
        cmocka_unit_test(info_describes_host),
        cmocka_unit_test(info_without_instance),
    };
    static const struct CMUnitTest busca_tests[] = {
        cmocka_unit_test(busca_key_folds),
        cmocka_unit_test(busca_key_rejects),
        cmocka_unit_test_setup_teardown(busca_finds_shipped_people, tmp_setup,
                                        tmp_teardown),
        cmocka_unit_test_setup_teardown(busca_unknown_and_bad_names, tmp_setup,
                                        tmp_teardown),
        cmocka_unit_test_setup_teardown(busca_reopen_does_not_reimport,
                                        tmp_setup, tmp_teardown),
        cmocka_unit_test_setup_teardown(busca_rejects_duplicate_people,
                                        tmp_setup, tmp_teardown),
        cmocka_unit_test_setup_teardown(busca_rejects_bad_data_files, tmp_setup,
                                        tmp_teardown),
        cmocka_unit_test_setup_teardown(busca_concurrent_start_imports_once,
                                        tmp_setup, tmp_teardown),
    };
    const char *only = argc > 1 ? argv[1] : NULL;
    int ran = 0, failed = 0;

#define RUN_GROUP(name, tests)                                          \
    if (only == NULL || strcmp(only, name) == 0) {                      \
        failed += cmocka_run_group_tests_name(name, tests, NULL, NULL); \
        ran++;                                                          \
    }
    RUN_GROUP("soma", soma_tests)
    RUN_GROUP("media", media_tests)
    RUN_GROUP("info", info_tests)
    RUN_GROUP("busca", busca_tests)
#undef RUN_GROUP
    if (ran == 0) {
        fprintf(stderr, "usage: %s [soma|media|info|busca]\n", argv[0]);
        return 2;
    }
    return failed != 0;
}
