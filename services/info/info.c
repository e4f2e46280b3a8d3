#include "info.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/utsname.h>
#include <unistd.h>

json_t *info_handle(json_t *request, mqrpc_fault *fault, void *arg)
{
    const char *instance = arg != NULL ? (const char *)arg : "unknown";
    struct utsname uts;
    char host[256];
    json_t *result;

    (void)request;
    if (uname(&uts) < 0)
        return mqrpc_fault_set(fault, MQRPC_INTERNAL,
                               "cannot read the system name: %s",
                               strerror(errno));
    /*
     * gethostname gives the same name mqrpc_instance_id uses; the utsname
     * node name is the fallback. POSIX does not promise a terminator on
     * truncation, hence the explicit one.
     */
    if (gethostname(host, sizeof host) < 0)
        snprintf(host, sizeof host, "%s", uts.nodename);
    host[sizeof host - 1] = '\0';

    result = json_pack("{s:s, s:s, s:s, s:I, s:s}", "so", uts.sysname, "versao",
                       uts.release, "hostname", host, "pid",
                       (json_int_t)getpid(), "instancia", instance);
    /* json_pack also fails on a string that is not valid UTF-8. */
    if (result == NULL)
        return mqrpc_fault_set(fault, MQRPC_INTERNAL,
                               "cannot build the system description");
    return result;
}
