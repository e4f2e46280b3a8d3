/* Broker URLs: parsing, resolution, URL files, TLS query parameters and
 * redaction. String handling only: no rabbitmq-c, so the rules are ours and
 * tested here. The parser follows the RabbitMQ AMQP URI spec and accepts
 * every URL rabbitmq-c's amqp_parse_url accepts, with the same meaning, but
 * a few it took in a surprising way (see mqr_url_parse). */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef MQRPC_STATE_DIR_DEFAULT
#define MQRPC_STATE_DIR_DEFAULT "var"
#endif

#define FALLBACK_URL "amqp://guest:guest@localhost:5672/"

static mqrpc_err copy_out(const char *url, char *buf, size_t len)
{
    size_t n = strlen(url);
    if (n >= len)
        return MQRPC_EINVAL;
    memcpy(buf, url, n + 1);
    return MQRPC_OK;
}

mqrpc_err mqrpc_url_file_read(const char *path, char *buf, size_t len,
                              char *err, size_t errlen)
{
    struct stat st;
    ssize_t n;
    size_t end;
    int fd;

    if (!path || !buf || len == 0) {
        snprintf(err, errlen, "no URL file given");
        return MQRPC_EINVAL;
    }
    /* O_NONBLOCK: opening a FIFO would otherwise wait for a writer,
     * forever; it is refused below like any file that is not regular. */
    fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) {
        snprintf(err, errlen, "cannot open URL file %s: %s", path,
                 strerror(errno));
        return MQRPC_EINVAL;
    }
    /* fstat on the open file: what is checked is what is read. The rule is
     * ssh's for private keys: a secret others can read is already leaked. */
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "URL file %s is not a regular file", path);
        close(fd);
        return MQRPC_EINVAL;
    }
    if (st.st_mode & (S_IRWXG | S_IRWXO)) {
        snprintf(err, errlen,
                 "URL file %s is accessible by group or others (mode %04o); "
                 "it holds a password: chmod 600 it",
                 path, (unsigned)(st.st_mode & 07777));
        close(fd);
        return MQRPC_EINVAL;
    }
    if (st.st_uid != geteuid()) {
        snprintf(err, errlen,
                 "URL file %s is owned by uid %u, not by this user (%u)", path,
                 (unsigned)st.st_uid, (unsigned)geteuid());
        close(fd);
        return MQRPC_EINVAL;
    }
    n = read(fd, buf, len - 1);
    close(fd);
    if (n < 0) {
        snprintf(err, errlen, "cannot read URL file %s: %s", path,
                 strerror(errno));
        return MQRPC_EINVAL;
    }
    buf[n] = '\0';
    end = strcspn(buf, "\r\n");
    if (end == (size_t)n && (size_t)n == len - 1) {
        snprintf(err, errlen, "URL file %s: first line too long", path);
        return MQRPC_EINVAL;
    }
    buf[end] = '\0';
    if (end == 0) {
        snprintf(err, errlen, "URL file %s is empty", path);
        return MQRPC_EINVAL;
    }
    return MQRPC_OK;
}

/* The private broker writes one URL file per account into its state
 * directory. Returns 1 if read, 0 if there is no such file, -1 on error. */
static int read_state_url(mqrpc_role role, char *buf, size_t len, char *err,
                          size_t errlen)
{
    const char *dir = getenv("MQRPC_STATE_DIR");
    char path[4096];

    if (!dir || !*dir)
        dir = MQRPC_STATE_DIR_DEFAULT;
    snprintf(path, sizeof path, "%s/%s", dir,
             role == MQRPC_ROLE_SERVICE ? "services.url" : "clients.url");
    if (access(path, F_OK) != 0 && errno == ENOENT)
        return 0;
    return mqrpc_url_file_read(path, buf, len, err, errlen) == MQRPC_OK ? 1
                                                                        : -1;
}

mqrpc_err mqrpc_default_url(const char *explicit_url, mqrpc_role role,
                            char *buf, size_t len, const char **source)
{
    char err[512];
    return mqr_resolve_url(explicit_url, role, buf, len, source, err,
                           sizeof err);
}

mqrpc_err mqr_resolve_url(const char *explicit_url, mqrpc_role role, char *buf,
                          size_t len, const char **source, char *err,
                          size_t errlen)
{
    const char *env = getenv("AMQP_URL");
    const char *dummy;
    int r;

    if (!source)
        source = &dummy;
    if (!buf || len == 0)
        return MQRPC_EINVAL;
    if (explicit_url && *explicit_url) {
        *source = "--url";
        if (copy_out(explicit_url, buf, len) != MQRPC_OK)
            goto too_long;
        return MQRPC_OK;
    }
    if (env && *env) {
        *source = "AMQP_URL";
        if (copy_out(env, buf, len) != MQRPC_OK)
            goto too_long;
        return MQRPC_OK;
    }
    r = read_state_url(role, buf, len, err, errlen);
    if (r > 0) {
        *source = "state file";
        return MQRPC_OK;
    }
    if (r < 0)
        return MQRPC_EINVAL;
    *source = "default";
    return copy_out(FALLBACK_URL, buf, len);
too_long:
    snprintf(err, errlen, "broker URL longer than %zu bytes", len - 1);
    return MQRPC_EINVAL;
}

/* query_start returns where the query of s begins: at the first of the
 * parameters mqr_url_parse_query knows. Not at any '?' or '#', which may
 * be part of a password typed raw. */
static const char *query_start(const char *s)
{
    static const char *const names[] = {"?cacertfile=", "?certfile=",
                                        "?keyfile="};
    const char *end = s + strlen(s), *p;

    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if ((p = strstr(s, names[i])) && p < end)
            end = p;
    return end;
}

static void redact_one(const char *url, char *buf, size_t len);

void mqrpc_url_redact(const char *url, char *buf, size_t len)
{
    mqr_str e[MQR_URL_MAX_ENTRIES];
    unsigned n = mqr_url_entries(url, e, MQR_URL_MAX_ENTRIES);
    size_t used = 0;

    if (!buf || len == 0)
        return;
    if (n <= 1 || n > MQR_URL_MAX_ENTRIES) {
        redact_one(url, buf, len);
        return;
    }
    /* Each entry on its own: every password of the list is masked. */
    buf[0] = '\0';
    for (unsigned i = 0; i < n && used + 1 < len; i++) {
        char *one = strndup(e[i].ptr, e[i].len);
        if (!one) {
            snprintf(buf, len, "(%u broker URLs)", n);
            return;
        }
        if (i > 0)
            buf[used++] = ',';
        redact_one(one, buf + used, len - used);
        used += strlen(buf + used);
        free(one);
    }
    buf[used < len ? used : len - 1] = '\0';
}

static void redact_one(const char *url, char *buf, size_t len)
{
    const char *scheme_end, *at, *colon;

    if (!buf || len == 0)
        return;
    if (!url) {
        buf[0] = '\0';
        return;
    }
    scheme_end = strstr(url, "://");
    /* The last '@' before the query: a password typed with any of "@/?#"
     * raw is still masked; at worst the host is masked too. */
    at = NULL;
    if (scheme_end) {
        const char *p, *end = query_start(scheme_end + 3);
        for (p = scheme_end + 3; p < end; p++)
            if (*p == '@')
                at = p; /* the last '@': passwords may contain '@' raw */
    }
    colon =
        at ? memchr(scheme_end + 3, ':', (size_t)(at - scheme_end - 3)) : NULL;
    if (!colon) {
        snprintf(buf, len, "%s", url);
        return;
    }
    snprintf(buf, len, "%.*s:****%s", (int)(colon - url), url, at);
}

/* Loopback: the only place where plain AMQP cannot be read by others. */
static bool is_loopback(const char *host)
{
    return strcasecmp(host, "localhost") == 0 ||
           strncmp(host, "127.", 4) == 0 || strcmp(host, "::1") == 0 ||
           strcmp(host, "[::1]") == 0;
}

int mqrpc_url_plaintext_remote(const char *url)
{
    mqr_str e[MQR_URL_MAX_ENTRIES];
    unsigned n = mqr_url_entries(url, e, MQR_URL_MAX_ENTRIES);
    int r = 0;

    /* One clear-text entry is enough to cross the network in clear. */
    for (unsigned i = 0; i < n && i < MQR_URL_MAX_ENTRIES && !r; i++) {
        char *one = strndup(e[i].ptr, e[i].len), err[256];
        mqr_url u;
        if (one && mqr_url_parse(one, &u, err, sizeof err) == MQRPC_OK) {
            r = !u.tls && !is_loopback(u.host);
            mqr_url_clear(&u);
        }
        free(one);
    }
    return r;
}

static int hexval(int ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

/* url_decode decodes %XX in place. Returns NULL, or what is wrong: a '%'
 * without two hex digits, or an encoded NUL, which would cut the string
 * short where C reads it (rabbitmq-c did exactly that). */
static const char *url_decode(char *s)
{
    char *w = s;
    for (; *s; s++) {
        if (*s == '%') {
            int hi = hexval((unsigned char)s[1]);
            int lo = hi < 0 ? -1 : hexval((unsigned char)s[2]);
            if (lo < 0)
                return "'%' must be followed by two hex digits (write a "
                       "'%' itself as %25)";
            if (hi == 0 && lo == 0)
                return "%00 (a NUL byte) is not allowed";
            *w++ = (char)(hi * 16 + lo);
            s += 2;
        } else {
            *w++ = *s;
        }
    }
    *w = '\0';
    return NULL;
}

static bool percent_decode(char *s)
{
    return url_decode(s) == NULL;
}

/* parse_port reads a port: decimal digits only, 1 to 65535. */
static const char *parse_port(const char *s, int *port)
{
    long v = 0;

    if (!*s)
        return "no port after ':'";
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return "port must be a decimal number";
        if (v <= 65535) /* stays in range however many digits follow */
            v = v * 10 + (*s - '0');
    }
    if (v < 1 || v > 65535)
        return "port must be 1 to 65535";
    *port = (int)v;
    return NULL;
}

/* parse_authority splits [user[:password]@]host[:port] (a, written into)
 * and fills out's fields that it names. Delimiters are found before
 * anything is decoded, so an encoded one (%40, %3A) is data. */
static const char *parse_authority(char *a, mqr_url *out)
{
    char *at = strchr(a, '@'), *host = a, *port = NULL, *colon;
    const char *why;

    if (at) {
        /* A second '@' is a password typed raw, or a host with a '@':
         * either way we cannot tell where the password ends. */
        if (strchr(at + 1, '@'))
            return "'@' in a user name or password must be written %40";
        *at = '\0';
        host = at + 1;
        if (a[strcspn(a, "[]")])
            return "'[' or ']' in a user name or password must be written "
                   "%5B or %5D";
        colon = strchr(a, ':');
        if (colon) {
            *colon = '\0';
            if (strchr(colon + 1, ':'))
                return "':' in a password must be written %3A";
            if ((why = url_decode(colon + 1)) != NULL)
                return why;
            out->password = colon + 1;
        }
        if ((why = url_decode(a)) != NULL)
            return why;
        out->user = a;
    }
    if (*host == '[') {
        char *close = strchr(host, ']');
        if (!close)
            return "'[' opens an IPv6 address that no ']' closes";
        *close = '\0';
        host++;
        if (!*host)
            return "empty IPv6 address in []";
        if (strchr(host, '['))
            return "'[' inside an IPv6 address";
        if (close[1] == ':')
            port = close + 2;
        else if (close[1])
            return "only :PORT may follow an IPv6 address in []";
    } else {
        colon = strchr(host, ':');
        if (colon) {
            *colon = '\0';
            port = colon + 1;
        }
        if (host[strcspn(host, "[]")])
            return "'[' and ']' may only enclose a whole IPv6 address";
    }
    if (port && (why = parse_port(port, &out->port)) != NULL)
        return why;
    if ((why = url_decode(host)) != NULL)
        return why;
    if (*host)
        out->host = host; /* empty: localhost, as in the spec */
    return NULL;
}

/* parse_base parses url without its query (written into) into out. */
static const char *parse_base(char *url, mqr_url *out)
{
    char *rest, *slash;
    const char *why;

    out->user = "guest";
    out->password = "guest";
    out->host = "localhost";
    out->vhost = "/";
    if (strncmp(url, "amqp://", 7) == 0) {
        out->port = 5672;
        rest = url + 7;
    } else if (strncmp(url, "amqps://", 8) == 0) {
        out->port = 5671;
        out->tls = true;
        rest = url + 8;
    } else {
        return "it must start with amqp:// or amqps://";
    }
    if (strchr(rest, '#'))
        return "'#' must be written %23";
    slash = strchr(rest, '/');
    if (slash)
        *slash = '\0';
    if ((why = parse_authority(rest, out)) != NULL)
        return why;
    if (!slash)
        return NULL;
    /* The path is the vhost, one segment. ':' and '@' are legal in a
     * segment, but rabbitmq-c refuses them, and "amqp://u:1/x@h" is a
     * password with a raw '/' far more often than host u, vhost "x@h". */
    if (strchr(slash + 1, '/'))
        return "the vhost is one path segment: write a '/' in it as %2F";
    if (slash[1 + strcspn(slash + 1, ":@[]")])
        return "':', '@', '[' and ']' in a vhost must be written %3A, %40, "
               "%5B and %5D";
    if ((why = url_decode(slash + 1)) != NULL)
        return why;
    /* "amqp://host:5672/" has an empty path, which the AMQP URI spec reads
     * as vhost "". Nobody means that (no broker has such a vhost by
     * default) and pika reads it as "/": so do we. */
    if (slash[1])
        out->vhost = slash + 1;
    return NULL;
}

/* mqr_url_parse parses by the RabbitMQ AMQP URI spec, and takes every URL
 * rabbitmq-c's amqp_parse_url takes, the same way, except where it was
 * surprising: a port must be digits only, 1 to 65535 (rabbitmq-c took
 * "+5672", " 5672", port 0, "%35672", and "h:1:2" as port 2); %00 is
 * refused (it cut the string short), and so is a '%' without two hex
 * digits (sscanf let it take "% f" and "%+f"); %80 to %FF are bytes (it
 * refused them, and so UTF-8 passwords); "[]" and a '@' in [] are refused.
 * The query, from the first '?', is ours: rabbitmq-c never saw it. */
mqrpc_err mqr_url_parse(const char *url, mqr_url *out, char *err, size_t errlen)
{
    char *copy, *query;
    const char *why;
    mqrpc_err e;

    memset(out, 0, sizeof *out);
    if (!url || !*url) {
        snprintf(err, errlen, "empty broker URL");
        return MQRPC_EURL;
    }
    copy = strdup(url);
    if (!copy)
        return MQRPC_ENOMEM;
    out->buf_ = copy;
    query = strchr(copy, '?');
    if (query)
        *query++ = '\0';
    why = parse_base(copy, out);
    if (why) {
        char shown[512];
        mqrpc_url_redact(url, shown, sizeof shown);
        snprintf(err, errlen, "malformed broker URL \"%s\": %s", shown, why);
        mqr_url_clear(out);
        return MQRPC_EURL;
    }
    if (query && *query) {
        e = mqr_url_parse_query(query, out, err, errlen);
        if (e == MQRPC_OK && !out->tls) {
            snprintf(err, errlen,
                     "URL parameters cacertfile, certfile and "
                     "keyfile need an amqps:// URL");
            e = MQRPC_EURL;
        }
        if (e != MQRPC_OK) {
            mqr_url_clear(out);
            return e;
        }
    }
    return MQRPC_OK;
}

void mqr_url_clear(mqr_url *u)
{
    free(u->buf_);
    memset(u, 0, sizeof *u);
}

mqrpc_err mqr_url_parse_query(char *query, mqr_url *out, char *err,
                              size_t errlen)
{
    /* A '?' typed raw in a password ("amqp://u:12?secret=x@h/") starts the
     * query too early: the password's tail is read as a parameter. Any
     * text before the URL's last '@' may be such a tail, so it is never
     * quoted; the password ends before some '@', so text after the last one
     * is not part of it. */
    const char *last_at = strrchr(query, '@');
    const char *hint = " (write a '?' in a password as %3F)";
    char *save = NULL, *kv;

    for (kv = strtok_r(query, "&", &save); kv;
         kv = strtok_r(NULL, "&", &save)) {
        bool quotable = !last_at || kv > last_at;
        char *eq = strchr(kv, '=');
        char **slot;
        if (!eq) {
            if (quotable)
                snprintf(err, errlen, "URL parameter \"%.64s\" has no value",
                         kv);
            else
                snprintf(err, errlen, "URL parameter without a value%s",
                         hint);
            return MQRPC_EURL;
        }
        *eq = '\0';
        /* The names of RabbitMQ's URI query parameters, so one URL works
         * with its other clients too. */
        if (strcmp(kv, "cacertfile") == 0)
            slot = &out->ca_file;
        else if (strcmp(kv, "certfile") == 0)
            slot = &out->cert_file;
        else if (strcmp(kv, "keyfile") == 0)
            slot = &out->key_file;
        else {
            if (quotable)
                snprintf(err, errlen,
                         "unknown URL parameter \"%.64s\" (known: "
                         "cacertfile, certfile, keyfile)",
                         kv);
            else
                snprintf(err, errlen,
                         "unknown URL parameter (known: cacertfile, "
                         "certfile, keyfile)%s",
                         hint);
            return MQRPC_EURL;
        }
        if (!percent_decode(eq + 1) || !eq[1]) {
            snprintf(err, errlen, "URL parameter %s has a malformed value", kv);
            return MQRPC_EURL;
        }
        *slot = eq + 1;
    }
    return MQRPC_OK;
}

/* ------------------------------------------------------------ URL lists */

/* starts_entry: s (just after a ',') begins the next URL of a list: blanks,
 * then a scheme ("amqp://"; any "name://", so that a wrong one is reported
 * as that entry's). A ',' anywhere else is data (a password typed raw, a
 * vhost), as it was before lists existed. */
static const char *starts_entry(const char *s)
{
    const char *p;

    while (*s == ' ' || *s == '\t')
        s++;
    for (p = s; (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
                (p > s && ((*p >= '0' && *p <= '9') || *p == '+' ||
                           *p == '-' || *p == '.'));
         p++)
        ;
    return p > s && strncmp(p, "://", 3) == 0 ? s : NULL;
}

static mqr_str trimmed(const char *p, const char *end)
{
    mqr_str s;

    while (p < end && (*p == ' ' || *p == '\t'))
        p++;
    while (end > p && (end[-1] == ' ' || end[-1] == '\t'))
        end--;
    s.ptr = p;
    s.len = (size_t)(end - p);
    return s;
}

unsigned mqr_url_entries(const char *list, mqr_str *out, unsigned max)
{
    const char *p, *begin;
    unsigned n = 0;

    if (!list)
        return 0;
    for (p = begin = list;; p++) {
        const char *next = *p == ',' ? starts_entry(p + 1) : NULL;
        if (*p != '\0' && !next)
            continue;
        if (n < max)
            out[n] = trimmed(begin, p);
        n++;
        if (*p == '\0')
            return n;
        begin = next;
        p = next - 1;
    }
}

/* Writes entry i+1 of n's position into buf: "" for a single URL, whose
 * messages stay what they were before lists. */
static void position(char *buf, size_t len, unsigned i, unsigned n)
{
    if (n > 1)
        snprintf(buf, len, "entry %u of %u: ", i + 1, n);
    else
        buf[0] = '\0';
}

mqrpc_err mqr_url_list_check(const char *list, const mqrpc_tls_opts *tls,
                             char *err, size_t errlen)
{
    mqr_str e[MQR_URL_MAX_ENTRIES];
    unsigned n = mqr_url_entries(list, e, MQR_URL_MAX_ENTRIES);
    char pos[48], why[512];
    mqrpc_err r = MQRPC_OK;

    if (n > MQR_URL_MAX_ENTRIES) {
        snprintf(err, errlen, "%u broker URLs in the list, over the limit of %d",
                 n, MQR_URL_MAX_ENTRIES);
        return MQRPC_EURL;
    }
    for (unsigned i = 0; i < n && r == MQRPC_OK; i++) {
        char *one;
        mqr_url u;

        position(pos, sizeof pos, i, n);
        if (e[i].len == 0) {
            snprintf(err, errlen, "%sempty broker URL", pos);
            return MQRPC_EURL;
        }
        if (e[i].ptr[e[i].len - 1] == ',') {
            /* "a,,b" or "a,": a typo, not an address; the ',' stays with
             * a, as data. */
            char *bad = strndup(e[i].ptr, e[i].len), shown[512];
            mqrpc_url_redact(bad, shown, sizeof shown);
            snprintf(err, errlen,
                     "%s\"%s\" ends with ',' where the next URL should "
                     "follow (write a ',' in a password as %%2C)",
                     pos, bad ? shown : "");
            free(bad);
            return MQRPC_EURL;
        }
        one = strndup(e[i].ptr, e[i].len);
        if (!one)
            return MQRPC_ENOMEM;
        r = mqr_url_parse(one, &u, why, sizeof why);
        if (r == MQRPC_OK && !u.tls && tls &&
            (tls->ca_file || tls->cert_file || tls->key_file ||
             tls->insecure)) {
            snprintf(why, sizeof why,
                     "TLS options given for a plain amqp:// URL (use "
                     "amqps://)");
            r = MQRPC_EINVAL;
        }
        if (r != MQRPC_OK)
            snprintf(err, errlen, "%s%s", pos, why);
        mqr_url_clear(&u); /* parse cleared it on failure: harmless */
        free(one);
    }
    return r;
}

mqrpc_err mqrpc_url_check(const char *urls, const mqrpc_tls_opts *tls,
                          char *err, size_t errlen)
{
    char dummy[8];

    if (!err || errlen == 0) {
        err = dummy;
        errlen = sizeof dummy;
    }
    if (!urls || !*urls) {
        snprintf(err, errlen, "empty broker URL");
        return MQRPC_EURL;
    }
    return mqr_url_list_check(urls, tls, err, errlen);
}

void mqr_url_order(uint64_t seed, unsigned *order, unsigned n)
{
    uint64_t x = seed | 1;

    for (unsigned i = 0; i < n; i++)
        order[i] = i;
    if (seed == 0)
        return; /* the list's own order */
    /* Fisher-Yates over xorshift64: the same seed gives the same order, so
     * a handle walks its list in one order across attempts. */
    for (unsigned i = n; i > 1; i--) {
        unsigned j;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        j = (unsigned)(x % i);
        unsigned t = order[i - 1];
        order[i - 1] = order[j];
        order[j] = t;
    }
}

mqrpc_err mqr_url_pick(const char *list, uint64_t seed, unsigned next,
                       char *out, size_t outlen, unsigned *count)
{
    mqr_str e[MQR_URL_MAX_ENTRIES];
    unsigned order[MQR_URL_MAX_ENTRIES];
    unsigned n = mqr_url_entries(list, e, MQR_URL_MAX_ENTRIES);
    mqr_str s;

    *count = n;
    if (n == 0 || n > MQR_URL_MAX_ENTRIES)
        return MQRPC_EURL;
    mqr_url_order(seed, order, n);
    s = e[order[next % n]];
    if (s.len >= outlen)
        return MQRPC_EINVAL;
    memcpy(out, s.ptr, s.len);
    out[s.len] = '\0';
    return MQRPC_OK;
}
