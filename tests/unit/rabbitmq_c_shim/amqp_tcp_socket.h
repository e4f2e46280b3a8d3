/*
 * Test shim (tests/unit/rabbitmq_layout_test.sh): amqp_tcp_socket.h as rabbitmq-c
 * 0.12+ ships it, deprecated with a #warning, over the system's own one.
 * Quiet when reached through the shim's rabbitmq-c/ headers, since the real
 * new headers never include the old names.
 */
#ifndef MQRPC_SHIM_FORWARDING
#warning "amqp_tcp_socket.h is deprecated (rabbitmq-c >= 0.12): use the rabbitmq-c/ headers"
#endif
#include_next <amqp_tcp_socket.h>
