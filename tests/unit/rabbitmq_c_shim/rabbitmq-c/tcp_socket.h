/*
 * Test shim (tests/unit/rabbitmq_layout_test.sh): rabbitmq-c 0.12+'s
 * <rabbitmq-c/tcp_socket.h>, forwarding to the system's <amqp_tcp_socket.h>
 * without the warning the shim's amqp_tcp_socket.h gives other includers.
 */
#ifdef MQRPC_SHIM_FORWARDING
#include <amqp_tcp_socket.h>
#else
#define MQRPC_SHIM_FORWARDING
#include <amqp_tcp_socket.h>
#undef MQRPC_SHIM_FORWARDING
#endif
