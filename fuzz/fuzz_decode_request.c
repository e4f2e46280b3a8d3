/*
 * fuzz_decode_request: mqr_decode_request is the first code to read a
 * request body off the network, so it must hold its contract on any bytes:
 * success gives an object; failure gives no value and a one-line
 * bad_request fault that reaches the caller intact. Each input runs twice:
 * whole with the default limits (a default service), then without its
 * first three bytes under small limits taken from them, so the fuzzer
 * reaches the edge of every limit.
 */
#include "fuzz.h"

static void check_decode(const char *body, size_t len, const mqr_limits *lim)
{
    mqrpc_fault fault;
    json_t *v;
    mqrpc_err e;

    /* Garbage in the fault: the decoder must terminate what it writes. */
    memset(&fault, 0xA5, sizeof fault);
    e = mqr_decode_request(body, len, lim, &v, &fault);
    if (e == MQRPC_OK) {
        FUZZ_CHECK(json_is_object(v));
        json_decref(v);
        return;
    }
    FUZZ_CHECK(e == MQRPC_EINVAL && v == NULL);
    FUZZ_CHECK(strcmp(fault.code, MQRPC_BAD_REQUEST) == 0);
    FUZZ_CHECK(fuzz_is_line(fault.message, sizeof fault.message));
    fuzz_check_fault_wire(&fault);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* libFuzzer never passes NULL with size > 0, so the body NULL case of
     * mqr_decode_request is not reached here (nor by the service). */
    check_decode((const char *)data, size, NULL);
    if (size >= 3) {
        /* 0 keeps the default, as a service option of 0 does. */
        mqr_limits lim = {.max_body = data[0] * 4u,
                          .max_depth = data[1] % 8u,
                          .max_string = data[2] % 64u};
        check_decode((const char *)data + 3, size - 3, &lim);
    }
    return 0;
}
