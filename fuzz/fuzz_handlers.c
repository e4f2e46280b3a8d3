/*
 * fuzz_handlers: the four services' handlers, fed the way a service feeds
 * them: the body goes through mqr_decode_request with the default limits
 * and only an accepted object reaches the handler. The first byte picks the
 * handler (its low two bits: 0 soma, 1 media, 2 busca, 3 info) and, with
 * its high bit set, a small --max-items for media. Checks that every
 * answer is well formed, a result or a fault with a snake_case code and a
 * one-line message, and that it reaches the caller intact.
 */
#include "fuzz.h"

#include "busca.h"
#include "info.h"
#include "media.h"
#include "soma.h"

static busca_db *db;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    char err[512];

    /* Opened once, as a service does at start; in memory, so runs share
     * nothing and leave nothing behind. */
    db = busca_open(":memory:", BUSCA_DATA_FILE, err, sizeof err);
    if (!db) {
        dprintf(2, "fuzz_handlers: busca_open: %s\n", err);
        abort();
    }
    return 0;
}

static bool is_snake_case(const char *s)
{
    if (!*s)
        return false;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || *s == '_'))
            return false;
    return true;
}

static json_t *run_handler(uint8_t pick, json_t *request, mqrpc_fault *fault)
{
    media_opts opts = {.max_items = pick & 0x80 ? (pick >> 2 & 0x1F) + 1 : 0};

    switch (pick & 3) {
    case 0: return soma_handle(request, fault, NULL);
    case 1: return media_handle(request, fault, &opts);
    case 2: return busca_handle(request, fault, db);
    default: return info_handle(request, fault, "service_info@fuzz:1");
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    mqrpc_fault fault;
    json_t *request, *result;

    if (size < 1)
        return 0;
    memset(&fault, 0, sizeof fault);
    if (mqr_decode_request((const char *)data + 1, size - 1, NULL, &request,
                           &fault) != MQRPC_OK)
        return 0;
    /* Garbage, so a handler that returns NULL without a fault shows. */
    memset(&fault, 0xA5, sizeof fault);
    result = run_handler(data[0], request, &fault);
    json_decref(request);
    if (result) {
        fuzz_check_result_wire(result);
        json_decref(result);
        return 0;
    }
    FUZZ_CHECK(fuzz_is_cstr(fault.code, sizeof fault.code));
    FUZZ_CHECK(is_snake_case(fault.code));
    FUZZ_CHECK(fuzz_is_line(fault.message, sizeof fault.message));
    fuzz_check_fault_wire(&fault);
    return 0;
}
