#include "busca.h"

#include <errno.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>

/* Long enough to wait out another instance's import of a few thousand
 * people, short enough that a stuck database is reported promptly. */
#define BUSCA_BUSY_TIMEOUT_MS 5000

struct busca_db {
    sqlite3 *db;
    sqlite3_stmt *lookup; /* SELECT idade, cidade ... WHERE chave = ?1 */
    /* Handler threads (--threads) share the one prepared statement. */
    pthread_mutex_t lock;
};

/*
 * Replacements for U+00C0..U+00FF, indexed by code point - 0xC0. NULL keeps
 * the character (× and ÷ are not letters). Every replacement is at most the
 * two bytes of the UTF-8 it replaces, which is why a key never outgrows its
 * name.
 */
/* clang-format off */
static const char *const latin1_fold[64] = {
    "a",  "a",  "a",  "a",  "a",  "a",  "ae", "c",  /* À Á Â Ã Ä Å Æ Ç */
    "e",  "e",  "e",  "e",  "i",  "i",  "i",  "i",  /* È É Ê Ë Ì Í Î Ï */
    "d",  "n",  "o",  "o",  "o",  "o",  "o",  NULL, /* Ð Ñ Ò Ó Ô Õ Ö × */
    "o",  "u",  "u",  "u",  "u",  "y",  "th", "ss", /* Ø Ù Ú Û Ü Ý Þ ß */
    "a",  "a",  "a",  "a",  "a",  "a",  "ae", "c",  /* à á â ã ä å æ ç */
    "e",  "e",  "e",  "e",  "i",  "i",  "i",  "i",  /* è é ê ë ì í î ï */
    "d",  "n",  "o",  "o",  "o",  "o",  "o",  NULL, /* ð ñ ò ó ô õ ö ÷ */
    "o",  "u",  "u",  "u",  "u",  "y",  "th", "y",  /* ø ù ú û ü ý þ ÿ */
};
/* clang-format on */

static void set_err(char *err, size_t errlen, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    if (err == NULL || errlen == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* Our own test, because isspace() depends on the locale and would treat
 * some Latin-1 bytes, which are parts of UTF-8 sequences here, as blanks. */
static int is_blank(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' ||
           c == '\r';
}

/*
 * utf8_decode reads one code point from s (n > 0 bytes available) and
 * returns its length, or -1 for anything RFC 3629 forbids: stray
 * continuation bytes, truncation, overlong forms, surrogates, > U+10FFFF.
 */
static int utf8_decode(const unsigned char *s, size_t n, uint32_t *cp)
{
    uint32_t c, min;
    int len, i;

    if (s[0] < 0x80) {
        *cp = s[0];
        return 1;
    }
    if (s[0] < 0xC2) /* continuation byte, or overlong 2-byte form */
        return -1;
    if (s[0] < 0xE0) {
        len = 2, min = 0x80, c = s[0] & 0x1F;
    } else if (s[0] < 0xF0) {
        len = 3, min = 0x800, c = s[0] & 0x0F;
    } else if (s[0] < 0xF5) {
        len = 4, min = 0x10000, c = s[0] & 0x07;
    } else {
        return -1;
    }
    if (n < (size_t)len)
        return -1;
    for (i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return -1;
        c = (c << 6) | (s[i] & 0x3F);
    }
    if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF))
        return -1;
    *cp = c;
    return len;
}

int busca_key(const char *name, char *out, size_t outlen)
{
    const unsigned char *s = (const unsigned char *)name;
    const unsigned char *end;
    size_t o = 0;

    if (outlen == 0)
        return -1;
    out[0] = '\0';
    /* Blanks are ASCII, never inside a multi-byte sequence, so trimming
     * bytes before decoding cannot cut a character. */
    while (is_blank(*s))
        s++;
    end = s + strlen((const char *)s);
    while (end > s && is_blank(end[-1]))
        end--;

    while (s < end) {
        const char *rep;
        char lower;
        size_t rlen;
        uint32_t cp;
        int len = utf8_decode(s, (size_t)(end - s), &cp);

        if (len < 0)
            return -1;
        if (cp < 0x80) {
            lower =
                (cp >= 'A' && cp <= 'Z') ? (char)(cp - 'A' + 'a') : (char)cp;
            rep = &lower, rlen = 1;
        } else if (cp >= 0xC0 && cp <= 0xFF && latin1_fold[cp - 0xC0]) {
            rep = latin1_fold[cp - 0xC0], rlen = strlen(rep);
        } else {
            rep = (const char *)s, rlen = (size_t)len;
        }
        if (rlen >= outlen - o) {
            out[o] = '\0';
            return -1;
        }
        memcpy(out + o, rep, rlen);
        o += rlen;
        out[o] = '\0';
        s += len;
    }
    return 0;
}

/*
 * make_key stores busca_key(name) in *key, a buffer the caller frees, sized
 * from the name so it is never too small. Returns 0, -1 when out of memory
 * or -2 when name is not valid UTF-8 (*key is then NULL).
 */
static int make_key(const char *name, char **key)
{
    size_t size = strlen(name) + 1;

    if ((*key = malloc(size)) == NULL)
        return -1;
    if (busca_key(name, *key, size) < 0) {
        free(*key);
        *key = NULL;
        return -2;
    }
    return 0;
}

/* mkdir -p of the directory part of path; SQLite creates only the file. */
static int make_parent_dirs(const char *path, char *err, size_t errlen)
{
    char *dir = strdup(path);
    char *slash, *p;

    if (dir == NULL) {
        set_err(err, errlen, "out of memory");
        return -1;
    }
    slash = strrchr(dir, '/');
    if (slash == NULL || slash == dir) {
        free(dir);
        return 0;
    }
    *slash = '\0';
    for (p = dir + 1;; p++) {
        char c = *p;

        if (c != '/' && c != '\0')
            continue;
        *p = '\0';
        if (mkdir(dir, 0777) < 0 && errno != EEXIST) {
            set_err(err, errlen, "cannot create directory %s: %s", dir,
                    strerror(errno));
            free(dir);
            return -1;
        }
        if (c == '\0')
            break;
        *p = c;
    }
    free(dir);
    return 0;
}

static int exec_sql(sqlite3 *db, const char *db_path, const char *sql,
                    char *err, size_t errlen)
{
    if (sqlite3_exec(db, sql, NULL, NULL, NULL) == SQLITE_OK)
        return 0;
    set_err(err, errlen, "database %s: %s", db_path, sqlite3_errmsg(db));
    return -1;
}

/* load_people reads and parses the data file; the caller owns the array. */
static json_t *load_people(const char *data_path, char *err, size_t errlen)
{
    json_error_t jerr;
    struct stat st;
    json_t *people;
    FILE *fp;

    if (data_path == NULL || data_path[0] == '\0') {
        set_err(err, errlen,
                "the database is empty and no data file was given");
        return NULL;
    }
    if ((fp = fopen(data_path, "r")) == NULL) {
        set_err(err, errlen, "cannot read data file %s: %s", data_path,
                strerror(errno));
        return NULL;
    }
    /* fopen accepts a directory; reading it would surface as a confusing
     * JSON syntax error. */
    if (fstat(fileno(fp), &st) == 0 && S_ISDIR(st.st_mode)) {
        set_err(err, errlen, "cannot read data file %s: %s", data_path,
                strerror(EISDIR));
        fclose(fp);
        return NULL;
    }
    people = json_loadf(fp, JSON_REJECT_DUPLICATES, &jerr);
    fclose(fp);
    if (people == NULL) {
        set_err(err, errlen, "data file %s: line %d: %s", data_path, jerr.line,
                jerr.text);
        return NULL;
    }
    if (!json_is_array(people) || json_array_size(people) == 0) {
        set_err(err, errlen,
                "data file %s: expected a non-empty JSON array of people",
                data_path);
        json_decref(people);
        return NULL;
    }
    return people;
}

/* report_duplicate names the earlier person whose key a new name repeats,
 * since "Joao" clashing with "João" is not obvious from "Joao" alone. */
static void report_duplicate(sqlite3 *db, const char *data_path,
                             const char *nome, const char *key, char *err,
                             size_t errlen)
{
    sqlite3_stmt *st = NULL;
    const char *earlier = NULL;

    if (sqlite3_prepare_v2(db, "SELECT nome FROM pessoas WHERE chave = ?1", -1,
                           &st, NULL) == SQLITE_OK &&
        sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW)
        earlier = (const char *)sqlite3_column_text(st, 0);
    if (earlier != NULL && strcmp(earlier, nome) != 0)
        set_err(err, errlen,
                "data file %s: duplicate person \"%s\" (same name as \"%s\")",
                data_path, nome, earlier);
    else
        set_err(err, errlen, "data file %s: duplicate person \"%s\"", data_path,
                nome);
    sqlite3_finalize(st);
}

/* import_people inserts every person of the data file; the caller holds
 * the transaction and rolls it back if this fails. */
static int import_people(sqlite3 *db, const char *db_path,
                         const char *data_path, char *err, size_t errlen)
{
    sqlite3_stmt *insert = NULL;
    json_t *people, *person;
    char *key = NULL;
    int ret = -1;
    size_t i;

    if ((people = load_people(data_path, err, errlen)) == NULL)
        return -1;
    if (sqlite3_prepare_v2(db,
                           "INSERT INTO pessoas (chave, nome, idade, cidade) "
                           "VALUES (?1, ?2, ?3, ?4)",
                           -1, &insert, NULL) != SQLITE_OK) {
        set_err(err, errlen, "database %s: %s", db_path, sqlite3_errmsg(db));
        goto out;
    }
    json_array_foreach (people, i, person) {
        const char *nome, *cidade;
        json_error_t jerr;
        json_int_t idade;
        int rc;

        /* Entries are counted from 1, as someone reading the file would. */
        if (json_unpack_ex(person, &jerr, 0, "{s:s, s:I, s:s}", "nome", &nome,
                           "idade", &idade, "cidade", &cidade) < 0) {
            set_err(err, errlen, "data file %s: person %zu: %s", data_path,
                    i + 1, jerr.text);
            goto out;
        }
        if (idade < 0) {
            set_err(err, errlen,
                    "data file %s: person %zu: idade must not be negative",
                    data_path, i + 1);
            goto out;
        }
        free(key);
        rc = make_key(nome, &key);
        if (rc == -1) {
            set_err(err, errlen, "out of memory");
            goto out;
        }
        if (rc < 0 || key[0] == '\0') {
            set_err(err, errlen, "data file %s: person %zu: nome is %s",
                    data_path, i + 1, rc < 0 ? "not valid UTF-8" : "empty");
            goto out;
        }
        sqlite3_bind_text(insert, 1, key, -1, SQLITE_STATIC);
        sqlite3_bind_text(insert, 2, nome, -1, SQLITE_STATIC);
        sqlite3_bind_int64(insert, 3, idade);
        sqlite3_bind_text(insert, 4, cidade, -1, SQLITE_STATIC);
        rc = sqlite3_step(insert);
        sqlite3_reset(insert);
        /* A plain INSERT, not OR IGNORE: two people with one key is a data
         * error to report, not something to hide. Concurrent starts never
         * get here twice, because the emptiness check and this import share
         * one IMMEDIATE transaction. */
        if ((rc & 0xFF) == SQLITE_CONSTRAINT) {
            report_duplicate(db, data_path, nome, key, err, errlen);
            goto out;
        }
        if (rc != SQLITE_DONE) {
            set_err(err, errlen, "database %s: %s", db_path,
                    sqlite3_errmsg(db));
            goto out;
        }
    }
    ret = 0;
out:
    sqlite3_finalize(insert);
    free(key);
    json_decref(people);
    return ret;
}

/* fill_table creates the table and imports the data file if the table is
 * missing or empty, all in one transaction. */
static int fill_table(sqlite3 *db, const char *db_path, const char *data_path,
                      char *err, size_t errlen)
{
    sqlite3_stmt *st = NULL;
    int rc, filled;

    /* IMMEDIATE takes the write lock up front (waiting out the busy
     * timeout), so a second instance checks emptiness only after the first
     * has committed its import. */
    if (exec_sql(db, db_path, "BEGIN IMMEDIATE", err, errlen) < 0)
        return -1;
    if (exec_sql(db, db_path,
                 "CREATE TABLE IF NOT EXISTS pessoas ("
                 " chave TEXT NOT NULL UNIQUE,"
                 " nome TEXT NOT NULL,"
                 " idade INTEGER NOT NULL,"
                 " cidade TEXT NOT NULL)",
                 err, errlen) < 0)
        goto rollback;
    rc = sqlite3_prepare_v2(db, "SELECT EXISTS (SELECT 1 FROM pessoas)", -1,
                            &st, NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_step(st);
    if (rc != SQLITE_ROW) {
        set_err(err, errlen, "database %s: %s", db_path, sqlite3_errmsg(db));
        sqlite3_finalize(st);
        goto rollback;
    }
    filled = sqlite3_column_int(st, 0);
    sqlite3_finalize(st);
    if (!filled && import_people(db, db_path, data_path, err, errlen) < 0)
        goto rollback;
    if (exec_sql(db, db_path, "COMMIT", err, errlen) < 0)
        goto rollback;
    return 0;
rollback:
    sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
    return -1;
}

busca_db *busca_open(const char *db_path, const char *data_path, char *err,
                     size_t errlen)
{
    busca_db *b;
    int rc;

    set_err(err, errlen, "%s", "");
    if (db_path == NULL || db_path[0] == '\0') {
        set_err(err, errlen, "no database path given");
        return NULL;
    }
    if (make_parent_dirs(db_path, err, errlen) < 0)
        return NULL;
    if ((b = calloc(1, sizeof *b)) == NULL) {
        set_err(err, errlen, "out of memory");
        return NULL;
    }
    pthread_mutex_init(&b->lock, NULL);
    rc = sqlite3_open_v2(db_path, &b->db,
                         SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL);
    if (rc != SQLITE_OK) {
        set_err(err, errlen, "cannot open database %s: %s", db_path,
                b->db != NULL ? sqlite3_errmsg(b->db) : sqlite3_errstr(rc));
        goto fail;
    }
    sqlite3_busy_timeout(b->db, BUSCA_BUSY_TIMEOUT_MS);
    if (fill_table(b->db, db_path, data_path, err, errlen) < 0)
        goto fail;
    if (sqlite3_prepare_v2(b->db,
                           "SELECT idade, cidade FROM pessoas WHERE chave = ?1",
                           -1, &b->lookup, NULL) != SQLITE_OK) {
        set_err(err, errlen, "database %s: %s", db_path, sqlite3_errmsg(b->db));
        goto fail;
    }
    return b;
fail:
    busca_close(b);
    return NULL;
}

void busca_close(busca_db *b)
{
    if (b == NULL)
        return;
    sqlite3_finalize(b->lookup);
    sqlite3_close(b->db);
    pthread_mutex_destroy(&b->lock);
    free(b);
}

/* shown_name copies name for a fault message, control characters as '?'
 * so the message stays one line; only what fits in a message is copied. */
static const char *shown_name(const char *name, char *out, size_t outlen)
{
    size_t i;

    for (i = 0; name[i] && i + 1 < outlen; i++) {
        unsigned char c = (unsigned char)name[i];
        out[i] = c < 0x20 || c == 0x7F ? '?' : (char)c;
    }
    out[i] = '\0';
    return out;
}

json_t *busca_handle(json_t *request, mqrpc_fault *fault, void *arg)
{
    busca_db *b = arg;
    json_t *v = json_object_get(request, "nome");
    json_t *result = NULL;
    const char *nome;
    char *key, shown[sizeof fault->message];
    int rc;

    if (b == NULL)
        return mqrpc_fault_set(fault, MQRPC_INTERNAL,
                               "the people database is not open");
    if (v == NULL)
        return mqrpc_fault_set(fault, MQRPC_BAD_REQUEST,
                               "field \"nome\" is missing");
    if (!json_is_string(v))
        return mqrpc_fault_set(fault, MQRPC_BAD_REQUEST,
                               "field \"nome\" must be a string, got %s",
                               mqrpc_json_typename(v));
    nome = json_string_value(v);
    /* Only a decoder built with JSON_ALLOW_NUL lets "\u0000" through; a
     * name cut at the NUL would match someone else. */
    if (strlen(nome) != json_string_length(v))
        return mqrpc_fault_set(fault, MQRPC_BAD_REQUEST,
                               "field \"nome\" must not contain NUL");
    rc = make_key(nome, &key);
    if (rc == -1)
        return mqrpc_fault_set(fault, MQRPC_INTERNAL, "out of memory");
    if (rc < 0)
        return mqrpc_fault_set(fault, MQRPC_BAD_REQUEST,
                               "field \"nome\" is not valid UTF-8");
    if (key[0] == '\0') {
        free(key);
        return mqrpc_fault_set(fault, MQRPC_BAD_REQUEST,
                               "field \"nome\" must not be empty");
    }

    pthread_mutex_lock(&b->lock);
    sqlite3_bind_text(b->lookup, 1, key, -1, SQLITE_STATIC);
    rc = sqlite3_step(b->lookup);
    if (rc == SQLITE_ROW) {
        const char *cidade = (const char *)sqlite3_column_text(b->lookup, 1);

        if (cidade != NULL)
            result = json_pack("{s:I, s:s}", "idade",
                               (json_int_t)sqlite3_column_int64(b->lookup, 0),
                               "cidade", cidade);
        if (result == NULL)
            mqrpc_fault_set(fault, MQRPC_INTERNAL,
                            "cannot build the answer for \"%s\"",
                            shown_name(nome, shown, sizeof shown));
    } else if (rc == SQLITE_DONE) {
        mqrpc_fault_set(fault, MQRPC_NOT_FOUND, "no person named \"%s\"",
                        shown_name(nome, shown, sizeof shown));
    } else {
        mqrpc_fault_set(fault, MQRPC_INTERNAL, "database error: %s",
                        sqlite3_errmsg(sqlite3_db_handle(b->lookup)));
    }
    /* Reset releases the read lock, so an idle service never blocks another
     * instance's import; the key binding must go before the key does. */
    sqlite3_reset(b->lookup);
    sqlite3_clear_bindings(b->lookup);
    pthread_mutex_unlock(&b->lock);
    free(key);
    return result;
}
