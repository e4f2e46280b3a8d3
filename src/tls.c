/*
 * TLS settings and messages, with OpenSSL alone: amqp_conn.c makes
 * rabbitmq-c's socket and hands its SSL_CTX here, so that what we trust,
 * what we present and how failures read is decided in one place that does
 * not depend on rabbitmq-c.
 */
#include "internal.h"

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

void mqr_tls_reason(char *buf, size_t len)
{
    unsigned long e, last = 0;
    const char *r;

    while ((e = ERR_get_error()) != 0)
        last = e;
    r = last ? ERR_reason_error_string(last) : NULL;
    snprintf(buf, len, "%s", r ? r : "");
}

/* The first certificate problem found during this thread's handshake:
 * rabbitmq-c only says "peer verify failed", not why. */
static _Thread_local char verify_problem[200];

static int record_verify_error(int ok, X509_STORE_CTX *store)
{
    if (!ok && !verify_problem[0]) {
        snprintf(
            verify_problem, sizeof verify_problem, "%s",
            X509_verify_cert_error_string(X509_STORE_CTX_get_error(store)));
    }
    return ok;
}

mqrpc_err mqr_tls_setup(struct ssl_ctx_st *ctx, const char *ca,
                        const char *cert, const char *key, char *err,
                        size_t errlen)
{
    char why[160];

    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    if (ca) {
        if (SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1) {
            mqr_tls_reason(why, sizeof why);
            snprintf(err, errlen, "cannot load CA file %s: %s", ca,
                     access(ca, R_OK) != 0 ? strerror(errno) : why);
            return MQRPC_EINVAL;
        }
    } else if (SSL_CTX_set_default_verify_paths(ctx) != 1) {
        mqr_tls_reason(why, sizeof why);
        snprintf(err, errlen, "cannot load the system CA store: %s", why);
        return MQRPC_EINVAL;
    }
    if ((cert != NULL) != (key != NULL)) {
        snprintf(err, errlen,
                 "a client certificate needs its key and a key "
                 "its certificate: give both or neither");
        return MQRPC_EINVAL;
    }
    if (cert &&
        (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1 ||
         SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1)) {
        mqr_tls_reason(why, sizeof why);
        snprintf(err, errlen,
                 "cannot load client certificate %s with key %s: %s", cert, key,
                 access(cert, R_OK) != 0 || access(key, R_OK) != 0
                     ? strerror(errno)
                     : why);
        return MQRPC_EINVAL;
    }
    X509_STORE_set_verify_cb(SSL_CTX_get_cert_store(ctx), record_verify_error);
    return MQRPC_OK;
}

void mqr_tls_begin(void)
{
    verify_problem[0] = '\0';
    ERR_clear_error();
}

void mqr_tls_open_error(enum mqr_tls_failure kind, const char *fallback,
                        const char *host, const char *ca, char *why, size_t len)
{
    char reason[160];

    mqr_tls_reason(reason, sizeof reason);
    switch (kind) {
    case MQR_TLS_PEER_UNVERIFIED:
        snprintf(why, len,
                 "TLS: cannot verify the broker's certificate: %s (%s)",
                 verify_problem[0] ? verify_problem : "no certificate",
                 ca ? "is it signed by the CA in the CA file?"
                    : "give the CA that signed it with --cacert or the "
                      "cacertfile URL parameter");
        break;
    case MQR_TLS_HOST_MISMATCH:
        snprintf(why, len,
                 "TLS: the broker's certificate is not valid for host name "
                 "\"%s\" (connect with a name the certificate lists)",
                 host);
        break;
    default:
        if (verify_problem[0])
            snprintf(why, len,
                     "TLS: cannot verify the broker's certificate: %s",
                     verify_problem);
        else
            snprintf(why, len, "TLS handshake failed: %s",
                     reason[0] ? reason : fallback);
        break;
    }
}
