/*
 * fuzz_url: broker URLs come from --url, $AMQP_URL and URL files, and are
 * echoed into logs and error messages. Checks that mqr_url_parse fills
 * every field or says why not, that mqr_url_clear frees it all, that
 * mqrpc_url_redact terminates its output in any buffer size and never shows
 * the password there (when it is over 3 bytes, so it can be recognised,
 * and not also in what the URL shows around the mask anyway), that an
 * error never quotes a query parameter that may be part of the password,
 * and that mqrpc_url_plaintext_remote agrees with the parse.
 *
 * The input is a URL; or, with two NUL bytes in it, USER NUL PASSWORD NUL
 * REST, which becomes amqp://USER:PASSWORD@REST with the password as a
 * person would type it: raw, any byte. The redaction must hide that
 * password too: mqr_url_parse refuses such a URL when the password holds
 * a delimiter, and its error message then quotes it through
 * mqrpc_url_redact.
 */
#include "fuzz.h"

/* Exact-size heap buffers, so ASan sees a byte written past any of them. */
static const size_t redact_sizes[] = {1, 2, 8, 64, 512, 4096};

/* password_span finds the password's bytes in a URL that mqr_url_parse
 * accepted: its userinfo is "user:password@", neither part holding one of
 * ":/?#[]@" raw. False when the URL has no password (the default is used). */
static bool password_span(const char *url, const char **start,
                          const char **end)
{
    const char *s = strstr(url, "://");
    size_t i, j;

    if (!s)
        return false;
    s += 3;
    i = strcspn(s, ":/?#[]@");
    if (s[i] != ':')
        return false;
    j = i + 1 + strcspn(s + i + 1, ":/?#[]@");
    if (s[j] != '@')
        return false;
    *start = s + i + 1;
    *end = s + j;
    return true;
}

/* public_has: secret is in what a perfect redaction of url shows, the
 * password at [start, end) replaced by "****"; showing it leaks nothing. */
static bool public_has(const char *url, const char *start, const char *end,
                       const char *secret)
{
    size_t head = (size_t)(start - url);
    char *shown = malloc(head + 4 + strlen(end) + 1);
    bool found;

    FUZZ_CHECK(shown != NULL);
    sprintf(shown, "%.*s****%s", (int)head, url, end);
    found = strstr(shown, secret) != NULL;
    free(shown);
    return found;
}

/* typed_url builds the URL of a USER NUL PASSWORD NUL REST input, or
 * returns NULL when the password could not be told apart: USER holding one
 * of ":@/?#", REST an '@', PASSWORD what opens a query ("?keyfile=";
 * the three names end in "file=") or the next URL of a list. *start and *end delimit the password. */
static char *typed_url(const uint8_t *data, size_t size, const char **start,
                       const char **end)
{
    const uint8_t *nul1 = memchr(data, 0, size), *nul2;
    const char *user, *password, *rest;
    char *in, *url = NULL;

    if (!nul1)
        return NULL;
    nul2 = memchr(nul1 + 1, 0, size - (size_t)(nul1 + 1 - data));
    if (!nul2)
        return NULL;
    in = fuzz_cstr(data, size);
    user = in;
    password = in + (nul1 + 1 - data);
    rest = in + (nul2 + 1 - data);
    if (!user[strcspn(user, ":@/?#")] && !strchr(rest, '@') &&
        !strstr(password, "file=")) {
        mqr_str first;
        url = malloc(size + 16);
        FUZZ_CHECK(url != NULL);
        sprintf(url, "amqp://%s:%s@%s", user, password, rest);
        *start = url + strlen("amqp://") + strlen(user) + 1;
        *end = *start + strlen(password);
        /* A ',' then "name://" in the user or password starts the next URL
         * of a list (the README says to percent-encode that comma): the
         * password is then not one URL's. */
        mqr_url_entries(url, &first, 1);
        if (first.ptr + first.len < *end) {
            free(url);
            url = NULL;
        }
    }
    free(in);
    return url;
}

/* is_secret: password, taken from [start, end) of url (end NULL: the URL
 * has none, the default is used), must not be shown. */
static bool is_secret(const char *url, const char *password,
                      const char *start, const char *end)
{
    return password && end && strlen(password) > 3 &&
           !public_has(url, start, end, password);
}

static void check_redact(const char *url, const char *password, bool secret)
{
    for (size_t i = 0; i < sizeof redact_sizes / sizeof redact_sizes[0]; i++) {
        char *buf = malloc(redact_sizes[i]);

        FUZZ_CHECK(buf != NULL);
        mqrpc_url_redact(url, buf, redact_sizes[i]);
        FUZZ_CHECK(fuzz_is_cstr(buf, redact_sizes[i]));
        FUZZ_CHECK(!secret || !strstr(buf, password));
        free(buf);
    }
}

/* check_quoted_name: an error about a query parameter quotes its name only
 * when it comes after the URL's last '@': before it, it may be the tail of
 * a password with a raw '?'. (Looking for the whole password in the message
 * would miss such a tail, and find short passwords in its fixed words.) */
static void check_quoted_name(const char *url, const char *err)
{
    static const char *const openers[] = {"unknown URL parameter \"",
                                          "URL parameter \""};
    const char *at = strrchr(url, '@'), *name = NULL, *close;
    char *quoted;

    for (size_t i = 0; i < 2 && !name; i++)
        if (strncmp(err, openers[i], strlen(openers[i])) == 0)
            name = err + strlen(openers[i]);
    if (!at || !name || !(close = strrchr(name, '"')))
        return;
    quoted = fuzz_cstr((const uint8_t *)name, (size_t)(close - name));
    FUZZ_CHECK(strstr(at + 1, quoted) != NULL);
    free(quoted);
}

static void check_parsed(const char *url, const mqr_url *u)
{
    FUZZ_CHECK(u->host && u->user && u->password && u->vhost && u->buf_);
    FUZZ_CHECK(u->port >= 0 && u->port <= 65535);
    FUZZ_CHECK(u->tls == (strncmp(url, "amqps://", 8) == 0));
    FUZZ_CHECK(u->tls || !(u->ca_file || u->cert_file || u->key_file));
}

static bool has_plain_entry(const char *url)
{
    mqr_str entries[64];
    unsigned n = mqr_url_entries(url, entries, 64);
    bool found = false;

    for (unsigned i = 0; i < n && i < 64 && !found; i++) {
        char *one = fuzz_cstr((const uint8_t *)entries[i].ptr, entries[i].len);
        mqr_url u;
        char err[256];

        if (mqr_url_parse(one, &u, err, sizeof err) == MQRPC_OK) {
            found = strncmp(one, "amqp://", 7) == 0;
            mqr_url_clear(&u);
        }
        free(one);
    }
    return found;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *start = NULL, *end = NULL;
    char *url = typed_url(data, size, &start, &end), *password = NULL;
    char err[256];
    mqr_url u;
    mqrpc_err e;
    int remote;

    if (url)
        password = fuzz_cstr((const uint8_t *)start, (size_t)(end - start));
    else
        url = fuzz_cstr(data, size);
    memset(err, 0xA5, sizeof err);
    e = mqr_url_parse(url, &u, err, sizeof err);
    if (e == MQRPC_OK) {
        check_parsed(url, &u);
        /* The password the parser found, where the input did not say. */
        if (!password && password_span(url, &start, &end))
            password = strdup(u.password);
        mqr_url_clear(&u);
        FUZZ_CHECK(u.buf_ == NULL && u.host == NULL);
    } else {
        FUZZ_CHECK(e == MQRPC_EURL && fuzz_is_cstr(err, sizeof err) && err[0]);
    }
    if (e != MQRPC_OK)
        check_quoted_name(url, err);
    check_redact(url, password, is_secret(url, password, start, end));
    /* Clear text to a remote host is said of a list when one of its
     * entries is a well-formed amqp:// URL to one. */
    remote = mqrpc_url_plaintext_remote(url);
    FUZZ_CHECK(remote == 0 || remote == 1);
    if (remote == 1)
        FUZZ_CHECK(has_plain_entry(url));
    free(password);
    free(url);
    return 0;
}
