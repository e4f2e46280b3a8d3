/*
 * info: the handler of the "service_info" queue, which describes the host
 * and process that answered.
 */
#ifndef SVC_INFO_H
#define SVC_INFO_H

#include "mqrpc/mqrpc.h"

/*
 * info_handle is an mqrpc_handler_fn: it answers any request with
 * {"so": uname sysname, "versao": uname release, "hostname": host name,
 *  "pid": process id (integer), "instancia": instance id}, keys in that
 * order. arg is a const char * instance id (e.g. mqrpc_service_instance()),
 * borrowed and read on every call, so it must outlive the service; NULL is
 * reported as "unknown". Fails with internal if uname() fails. request is
 * borrowed and ignored; the result is a new reference owned by the caller.
 */
json_t *info_handle(json_t *request, mqrpc_fault *fault, void *arg);

#endif /* SVC_INFO_H */
