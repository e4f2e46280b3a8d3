/* The message codec: request and reply bodies to and from JSON. Pure: no
 * AMQP, no I/O, so it is unit-tested and fuzzed on its own. */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

mqrpc_err mqr_decode_request(const char *body, size_t len, size_t max_body,
                             json_t **out, mqrpc_fault *fault)
{
    json_error_t jerr;
    json_t *v;

    *out = NULL;
    if (max_body == 0)
        max_body = MQRPC_DEFAULT_MAX_BODY;
    if (len > max_body) {
        mqrpc_fault_set(fault, MQRPC_BAD_REQUEST,
                        "request body is %zu bytes, over the limit of %zu", len,
                        max_body);
        return MQRPC_EINVAL;
    }
    /* JSON_DECODE_ANY so that a bare number gets the clearer "must be an
     * object" message instead of a parse error. */
    v = json_loadb(body ? body : "", len, JSON_DECODE_ANY, &jerr);
    if (!v) {
        mqrpc_fault_set(fault, MQRPC_BAD_REQUEST,
                        "request body is not valid JSON: %s (line %d, "
                        "column %d)",
                        jerr.text, jerr.line, jerr.column);
        return MQRPC_EINVAL;
    }
    if (!json_is_object(v)) {
        mqrpc_fault_set(fault, MQRPC_BAD_REQUEST,
                        "request body must be a JSON object, got %s",
                        mqrpc_json_typename(v));
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
    json_t *v = json_pack("{s:{s:s,s:s}}", "error", "code",
                          fault->code[0] ? fault->code : MQRPC_INTERNAL,
                          "message", fault->message);
    char *s;

    /* json_pack fails only on allocation or invalid UTF-8 in the message
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
                        jerr.text);
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
