/*
 * fuzz_decode_reply: a client decodes whatever a service (or anyone who
 * may publish to its reply queue) sends back. Checks, for both values of
 * the AMQP type=error flag, that the outcome is one of the three documented
 * ones with the output set accordingly (the library's own bad_reply message
 * one line, fit for a terminal), and that a result decoded from the
 * wire encodes again and decodes to an equal value: what a client passes on
 * is what it received.
 */
#include "fuzz.h"

static void check_reply(bool is_error, const char *body, size_t len)
{
    mqrpc_fault fault;
    json_t *result;
    mqrpc_err e;

    memset(&fault, 0xA5, sizeof fault);
    e = mqr_decode_reply(is_error, body, len, &result, &fault);
    FUZZ_CHECK(fuzz_is_cstr(fault.code, sizeof fault.code));
    FUZZ_CHECK(fuzz_is_cstr(fault.message, sizeof fault.message));
    if (e == MQRPC_OK) {
        FUZZ_CHECK(!is_error && result != NULL);
        fuzz_check_result_wire(result);
        json_decref(result);
        return;
    }
    FUZZ_CHECK(result == NULL);
    if (e == MQRPC_EBADREPLY)
        FUZZ_CHECK(strcmp(fault.code, "bad_reply") == 0 &&
                   fuzz_is_line(fault.message, sizeof fault.message));
    else
        FUZZ_CHECK(e == MQRPC_EREMOTE && is_error);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    check_reply(false, (const char *)data, size);
    check_reply(true, (const char *)data, size);
    return 0;
}
