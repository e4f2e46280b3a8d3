/* The message codec: request and reply bodies to and from JSON. Pure: no
 * AMQP, no I/O, so it is unit-tested on its own. */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/*
 * too_deep says whether body nests arrays and objects deeper than max_depth,
 * counting brackets outside strings. It runs before jansson, whose parser
 * recurses once per level up to its own limit (2048): so a body of 100000
 * '[' costs one linear scan instead of a deep stack, and the message names
 * our limit. It need not understand JSON: on malformed input either it
 * trips or jansson reports the syntax error, a bad_request both ways.
 */
static bool too_deep(const char *body, size_t len, size_t max_depth)
{
    bool in_string = false, escaped = false;
    size_t depth = 0;

    for (size_t i = 0; i < len; i++) {
        char c = body[i];
        if (in_string) {
            if (escaped)
                escaped = false;
            else if (c == '\\')
                escaped = true;
            else if (c == '"')
                in_string = false;
        } else if (c == '"') {
            in_string = true;
        } else if (c == '[' || c == '{') {
            if (++depth > max_depth)
                return true;
        } else if ((c == ']' || c == '}') && depth > 0) {
            depth--;
        }
    }
    return false;
}

/* Room for the path in a message: it has to fit in mqrpc_fault.message with
 * the sentence around it, so a cut never splits a UTF-8 sequence there. */
#define PATH_MAX_LEN 160
/* Bytes of a key quoted in a path; longer keys end in "...". */
#define KEY_EXCERPT 24

/* path_push appends a component to path (length n) and returns the new
 * length; when it does not fit, the path ends in "..." instead. */
static size_t path_push(char *path, size_t n, const char *comp)
{
    size_t len = strlen(comp);

    if (n + len < PATH_MAX_LEN - 4) {
        memcpy(path + n, comp, len + 1);
        return n + len;
    }
    if (n >= 3 && memcmp(path + n - 3, "...", 3) == 0)
        return n;
    memcpy(path + n, "...", 4);
    return n + 3;
}

/* key_excerpt writes ".key" for a path: at most KEY_EXCERPT bytes of key,
 * cut on a UTF-8 boundary, control characters as '?', so a message quoting
 * a hostile key stays short, one line and valid UTF-8. */
static void key_excerpt(const char *key, char *out, size_t outlen)
{
    size_t len = strlen(key), n = len, j = 0;

    if (n > KEY_EXCERPT) {
        n = KEY_EXCERPT;
        while (n > 0 && ((unsigned char)key[n] & 0xC0) == 0x80)
            n--;
    }
    out[j++] = '.';
    for (size_t i = 0; i < n && j + 4 < outlen; i++) {
        unsigned char c = (unsigned char)key[i];
        out[j++] = c < 0x20 || c == 0x7F ? '?' : (char)c;
    }
    if (n < len && j + 4 <= outlen) {
        memcpy(out + j, "...", 3);
        j += 3;
    }
    out[j] = '\0';
}

/* Numbers and literals are skipped without building their path: a list of
 * half a million numbers is the common large request. */
static bool holds_strings(const json_t *v)
{
    return json_is_string(v) || json_is_object(v) || json_is_array(v);
}

/*
 * long_string finds a string value or object key longer than max bytes
 * (decoded, as the handler sees it) and describes it in fault. After the
 * parse rather than in too_deep's scan because only the parser knows the
 * decoded length of "\u00e9"; the recursion is as deep as the request, which
 * too_deep (or jansson's own limit) has already bounded.
 */
static bool long_string(json_t *v, size_t max, char *path, size_t n,
                        mqrpc_fault *fault)
{
    char comp[KEY_EXCERPT + 32];
    const char *key;
    json_t *child;
    size_t i, m;

    switch (json_typeof(v)) {
    case JSON_STRING:
        if (json_string_length(v) <= max)
            return false;
        mqrpc_fault_set(fault, MQRPC_BAD_REQUEST,
                        "string longer than %zu bytes at %s", max, path);
        return true;
    case JSON_OBJECT:
        /* jansson refuses keys with NUL, so strlen is their length. */
        json_object_foreach (v, key, child) {
            bool long_key = strlen(key) > max;
            if (!long_key && !holds_strings(child))
                continue;
            key_excerpt(key, comp, sizeof comp);
            m = path_push(path, n, comp);
            if (long_key) {
                mqrpc_fault_set(fault, MQRPC_BAD_REQUEST,
                                "object key longer than %zu bytes at %s", max,
                                path);
                return true;
            }
            if (long_string(child, max, path, m, fault))
                return true;
        }
        break;
    case JSON_ARRAY:
        json_array_foreach (v, i, child) {
            if (!holds_strings(child))
                continue;
            snprintf(comp, sizeof comp, "[%zu]", i);
            m = path_push(path, n, comp);
            if (long_string(child, max, path, m, fault))
                return true;
        }
        break;
    default: break;
    }
    path[n] = '\0';
    return false;
}

/* one_line makes jansson's error text fit a one-line, valid UTF-8 message:
 * its "near '...'" quotes raw input, which may hold a newline, other control
 * characters or a cut UTF-8 sequence. Those bytes, and for simplicity every
 * non-ASCII one, become '?'. */
static const char *one_line(char *text)
{
    for (char *p = text; *p; p++)
        if ((unsigned char)*p < 0x20 || (unsigned char)*p >= 0x7F)
            *p = '?';
    return text;
}

mqrpc_err mqr_decode_request(const char *body, size_t len,
                             const mqr_limits *lim, json_t **out,
                             mqrpc_fault *fault)
{
    size_t max_body =
        lim && lim->max_body ? lim->max_body : MQRPC_DEFAULT_MAX_BODY;
    size_t max_depth =
        lim && lim->max_depth ? lim->max_depth : MQRPC_DEFAULT_MAX_DEPTH;
    size_t max_string =
        lim && lim->max_string ? lim->max_string : MQRPC_DEFAULT_MAX_STRING;
    char path[PATH_MAX_LEN] = "";
    json_error_t jerr;
    json_t *v;

    *out = NULL;
    if (len > max_body) {
        mqrpc_fault_set(fault, MQRPC_BAD_REQUEST,
                        "request body is %zu bytes, over the limit of %zu", len,
                        max_body);
        return MQRPC_EINVAL;
    }
    if (too_deep(body ? body : "", len, max_depth)) {
        mqrpc_fault_set(fault, MQRPC_BAD_REQUEST,
                        "request nested deeper than %zu levels", max_depth);
        return MQRPC_EINVAL;
    }
    /* JSON_DECODE_ANY so that a bare number gets the clearer "must be an
     * object" message instead of a parse error. Invalid UTF-8 is a parse
     * error too: jansson checks every string. */
    v = json_loadb(body ? body : "", len, JSON_DECODE_ANY, &jerr);
    if (!v) {
        mqrpc_fault_set(fault, MQRPC_BAD_REQUEST,
                        "request body is not valid JSON: %s (line %d, "
                        "column %d)",
                        one_line(jerr.text), jerr.line, jerr.column);
        return MQRPC_EINVAL;
    }
    if (!json_is_object(v)) {
        mqrpc_fault_set(fault, MQRPC_BAD_REQUEST,
                        "request body must be a JSON object, got %s",
                        mqrpc_json_typename(v));
        json_decref(v);
        return MQRPC_EINVAL;
    }
    if (long_string(v, max_string, path, 0, fault)) {
        json_decref(v);
        return MQRPC_EINVAL;
    }
    *out = v;
    return MQRPC_OK;
}

/* Non-compact output ("a": 1, "b": 2) is what the seed's Python services
 * send (json.dumps), so people reading raw bodies see the same thing. */
#define WIRE_FLAGS (JSON_ENCODE_ANY)

const char *mqrpc_json_typename(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "object";
    case JSON_ARRAY: return "array";
    case JSON_STRING: return "string";
    case JSON_INTEGER: return "integer";
    case JSON_REAL: return "real";
    case JSON_TRUE:
    case JSON_FALSE: return "boolean";
    case JSON_NULL: return "null";
    }
    return "unknown";
}

char *mqr_encode_result(const json_t *result, size_t *len)
{
    char *s = json_dumps(result, WIRE_FLAGS);
    if (s)
        *len = strlen(s);
    return s;
}

char *mqr_encode_fault(const mqrpc_fault *fault, size_t *len)
{
    size_t n = strlen(fault->message);
    json_t *v = NULL;
    char *s;

    /* mqrpc_fault_set cuts a long message at the end of its buffer, maybe
     * inside a UTF-8 sequence, which json_pack refuses: drop the (at most 3)
     * bytes of such a cut rather than lose the code and the message. */
    for (size_t cut = 0; !v && cut <= 3 && cut <= n; cut++)
        v = json_pack("{s:{s:s,s:s%}}", "error", "code",
                      fault->code[0] ? fault->code : MQRPC_INTERNAL,
                      "message", fault->message, n - cut);
    /* Otherwise json_pack failed on allocation or invalid UTF-8 elsewhere
     * (a handler quoting raw input); fall back to a fixed ASCII message. */
    if (!v)
        v = json_pack("{s:{s:s,s:s}}", "error", "code", MQRPC_INTERNAL,
                      "message", "error message could not be encoded");
    if (!v)
        return NULL;
    s = json_dumps(v, WIRE_FLAGS);
    json_decref(v);
    if (s)
        *len = strlen(s);
    return s;
}

mqrpc_err mqr_decode_reply(bool is_error, const char *body, size_t len,
                           json_t **result, mqrpc_fault *fault)
{
    json_error_t jerr;
    json_t *v, *err, *code, *msg;

    *result = NULL;
    fault->code[0] = fault->message[0] = '\0';
    v = json_loadb(body ? body : "", len, JSON_DECODE_ANY, &jerr);
    if (!v) {
        mqrpc_fault_set(fault, "bad_reply", "reply is not valid JSON: %s",
                        one_line(jerr.text));
        return MQRPC_EBADREPLY;
    }
    if (!is_error) {
        *result = v;
        return MQRPC_OK;
    }
    err = json_object_get(v, "error");
    code = json_object_get(err, "code");
    msg = json_object_get(err, "message");
    if (!json_is_string(code)) {
        mqrpc_fault_set(fault, "bad_reply",
                        "error reply without an error.code string");
        json_decref(v);
        return MQRPC_EBADREPLY;
    }
    mqrpc_fault_set(fault, json_string_value(code), "%s",
                    json_is_string(msg) ? json_string_value(msg)
                                        : "(no message)");
    json_decref(v);
    return MQRPC_EREMOTE;
}
