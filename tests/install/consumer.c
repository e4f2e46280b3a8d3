/*
 * A program that uses an installed libmqrpc (tests/install/install_test.sh):
 * built through find_package(mqrpc) and through pkg-config, shared and
 * static. Needs no broker: a client that never connects.
 */
#include <mqrpc/mqrpc.h>

#include <stdio.h>
#include <string.h>

int main(void)
{
    mqrpc_client *c = mqrpc_client_new(NULL);

    if (c == NULL) {
        fprintf(stderr, "mqrpc_client_new failed\n");
        return 1;
    }
    mqrpc_client_free(c);
    printf("%s: %s\n", mqrpc_errname(MQRPC_ETIMEOUT),
           mqrpc_strerror(MQRPC_ETIMEOUT));
    return strcmp(mqrpc_errname(MQRPC_ETIMEOUT), "timeout") != 0;
}
