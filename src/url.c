/* Broker URL resolution and redaction: string handling only. Parsing
 * proper is rabbitmq-c's (amqp_conn.c), so there is one set of rules. */
#include "internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

/* Reads the first line of the state directory's amqp_url file. Returns 1 if
 * found, 0 if there is no such file, -1 if it exists but is unusable. */
static int read_state_url(char *buf, size_t len)
{
    const char *dir = getenv("MQRPC_STATE_DIR");
    char path[4096];
    FILE *f;
    size_t n;

    if (!dir || !*dir)
        dir = MQRPC_STATE_DIR_DEFAULT;
    snprintf(path, sizeof path, "%s/amqp_url", dir);
    f = fopen(path, "r");
    if (!f)
        return errno == ENOENT ? 0 : -1;
    if (!fgets(buf, (int)len, f)) {
        fclose(f);
        return -1;
    }
    fclose(f);
    n = strcspn(buf, "\r\n");
    buf[n] = '\0';
    return n > 0 ? 1 : -1;
}

mqrpc_err mqrpc_default_url(const char *explicit_url, char *buf, size_t len,
                            const char **source)
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
        return copy_out(explicit_url, buf, len);
    }
    if (env && *env) {
        *source = "AMQP_URL";
        return copy_out(env, buf, len);
    }
    r = read_state_url(buf, len);
    if (r > 0) {
        *source = "state file";
        return MQRPC_OK;
    }
    if (r < 0)
        return MQRPC_EINVAL;
    *source = "default";
    return copy_out(FALLBACK_URL, buf, len);
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
    at = scheme_end ? strchr(scheme_end + 3, '@') : NULL;
    colon =
        at ? memchr(scheme_end + 3, ':', (size_t)(at - scheme_end - 3)) : NULL;
    if (!colon) {
        snprintf(buf, len, "%s", url);
        return;
    }
    snprintf(buf, len, "%.*s:****%s", (int)(colon - url), url, at);
}
