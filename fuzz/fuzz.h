/*
 * What the harnesses share. A property that does not hold is a crash
 * (abort), so libFuzzer saves the input and the replay test fails on it.
 */
#ifndef MQRPC_FUZZ_H
#define MQRPC_FUZZ_H

#include "internal.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* libFuzzer's entry points; replay_main.c calls them without libFuzzer. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

/* Straight to fd 2: fuzz_cli points stderr at /dev/null. */
#define FUZZ_CHECK(cond)                                                   \
    do {                                                                   \
        if (!(cond)) {                                                     \
            dprintf(2, "%s:%d: property failed: %s\n", __FILE__, __LINE__, \
                    #cond);                                                \
            abort();                                                       \
        }                                                                  \
    } while (0)

/* fuzz_cstr copies size bytes into a new NUL-terminated string (an
 * embedded NUL ends it early, as it would for a C caller). */
static inline char *fuzz_cstr(const uint8_t *data, size_t size)
{
    char *s = malloc(size + 1);

    FUZZ_CHECK(s != NULL);
    if (size)
        memcpy(s, data, size);
    s[size] = '\0';
    return s;
}

/* fuzz_is_cstr: buf (size bytes) holds a terminated string. */
static inline bool fuzz_is_cstr(const char *buf, size_t size)
{
    return memchr(buf, '\0', size) != NULL;
}

/* fuzz_is_line: a terminated, non-empty string without control
 * characters, fit for one line of a log or a terminal. */
static inline bool fuzz_is_line(const char *buf, size_t size)
{
    if (!fuzz_is_cstr(buf, size) || !buf[0])
        return false;
    for (const unsigned char *p = (const unsigned char *)buf; *p; p++)
        if (*p < 0x20 || *p == 0x7F)
            return false;
    return true;
}

/* fuzz_check_result_wire: a result a service encodes reaches the client
 * as an equal value. */
static inline void fuzz_check_result_wire(json_t *result)
{
    mqrpc_fault fault;
    json_t *again = NULL;
    size_t len = 0;
    char *wire = mqr_encode_result(result, &len);

    FUZZ_CHECK(wire != NULL);
    FUZZ_CHECK(mqr_decode_reply(false, wire, len, &again, &fault) ==
               MQRPC_OK);
    FUZZ_CHECK(json_equal(result, again));
    json_decref(again);
    free(wire);
}

/* fuzz_check_fault_wire: a fault a service encodes reaches the client with
 * its code, and its message but for a UTF-8 sequence cut at the end (by
 * mqrpc_fault_set's buffer). */
static inline void fuzz_check_fault_wire(const mqrpc_fault *fault)
{
    mqrpc_fault got;
    json_t *result = NULL;
    size_t len = 0, sent = strlen(fault->message);
    char *wire = mqr_encode_fault(fault, &len);

    FUZZ_CHECK(wire != NULL);
    FUZZ_CHECK(mqr_decode_reply(true, wire, len, &result, &got) ==
               MQRPC_EREMOTE);
    FUZZ_CHECK(result == NULL);
    FUZZ_CHECK(strcmp(got.code, fault->code) == 0);
    len = strlen(got.message);
    FUZZ_CHECK(len <= sent && sent - len <= 3);
    FUZZ_CHECK(memcmp(got.message, fault->message, len) == 0);
    free(wire);
}

#endif /* MQRPC_FUZZ_H */
