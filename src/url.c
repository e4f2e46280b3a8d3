/* Broker URL resolution, URL files, TLS query parameters and redaction:
 * string handling only. The authority part is parsed by rabbitmq-c
 * (amqp_conn.c), so there is one set of rules for it. */
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
    fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
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

void mqrpc_url_redact(const char *url, char *buf, size_t len)
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
    mqr_url u;
    char err[256];
    int r;

    if (mqr_url_parse(url, &u, err, sizeof err) != MQRPC_OK)
        return 0;
    r = !u.tls && !is_loopback(u.host);
    mqr_url_clear(&u);
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

/* Decodes %XX in place; false on a malformed escape or an encoded NUL. */
static bool percent_decode(char *s)
{
    char *w = s;
    for (; *s; s++) {
        if (*s == '%') {
            int hi = hexval((unsigned char)s[1]);
            int lo = hi < 0 ? -1 : hexval((unsigned char)s[2]);
            if (lo < 0 || (hi == 0 && lo == 0))
                return false;
            *w++ = (char)(hi * 16 + lo);
            s += 2;
        } else {
            *w++ = *s;
        }
    }
    *w = '\0';
    return true;
}

mqrpc_err mqr_url_parse_query(char *query, mqr_url *out, char *err,
                              size_t errlen)
{
    char *save = NULL, *kv;

    for (kv = strtok_r(query, "&", &save); kv;
         kv = strtok_r(NULL, "&", &save)) {
        char *eq = strchr(kv, '=');
        char **slot;
        if (!eq) {
            snprintf(err, errlen, "URL parameter \"%.64s\" has no value", kv);
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
            snprintf(err, errlen,
                     "unknown URL parameter \"%.64s\" (known: cacertfile, "
                     "certfile, keyfile)",
                     kv);
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
