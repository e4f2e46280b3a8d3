/*
 * rpc_chaos: the caller's side of the chaos run (scripts/chaos.sh). It
 * sends --calls calls round-robin to the four services, over several
 * connections with K calls in flight each, while the script kills service
 * instances and restarts the broker, and it accounts for every call: each
 * one has a record in one array, so a call completed twice (a duplicate
 * delivered to the caller) or never completed (lost) cannot go unnoticed.
 * Every answer is checked against what the call asked for.
 *
 * The script marks the broker restart with SIGUSR1 (stopping) and SIGUSR2
 * (up again); the report says how long callers went without answers. On a
 * cluster (scripts/chaos.sh --cluster, the broker.cluster test) SIGRTMIN
 * marks each node kill; the report gives, for each, how long until every
 * connection and every service answered correctly again.
 */
#include "cli.h"

#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNECTIONS 64
#define MAX_INFLIGHT 4096
#define MAX_CALLS 20000000L /* 32 bytes of record each */
#define REFUSED_BACKOFF_US 50000
#define DOWN_NAP_MS 20 /* between process calls on a dead connection */
#define DRAIN_GRACE_US 5000000 /* past the last deadline: the call is lost */
#define PROGRESS_US 5000000
#define MEDIA_MAX 5
#define NOT_FOUND_EVERY 8 /* one busca call in 8 asks for nobody */
#define NOBODY UINT16_MAX
#define MAX_KINDS 32
#define EXAMPLE_LEN 200
#define MAX_MARKS 256 /* node kills marked with SIGRTMIN */

_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2,
               "the signal handlers store times in atomic long longs");

enum queue_id { Q_SOMA, Q_MEDIA, Q_BUSCA, Q_INFO, NQUEUES };
static const char *const queue_names[NQUEUES] = {
    "service_soma", "service_media", "service_busca", "service_info"};

enum call_state { C_UNUSED, C_REFUSED, C_INFLIGHT, C_DONE, C_LOST };

struct conn;

/* One call, from the moment its number is taken to the end of the run.
 * Only the thread of the connection that made it touches it. */
struct call {
    int64_t expect; /* soma: a + b; media: the sum of its numbers */
    int64_t sent_us;
    struct conn *conn;
    uint16_t person; /* busca: index into the people, or NOBODY */
    uint8_t queue;
    uint8_t count; /* media: how many numbers */
    uint8_t state; /* enum call_state */
};

struct person {
    char *name_json; /* the name, JSON-encoded with its quotes */
    json_int_t idade;
    char *cidade;
};

/* Explicit errors by kind ("closed", "remote:dead_letter", ...). */
struct kind {
    char name[48];
    uint64_t n;
    char example[EXAMPLE_LEN];
};

struct tally {
    uint64_t sent, refused, correct, wrong, lost, duplicates;
    uint64_t canceled_after_lost; /* the library's cleanup of lost calls */
    struct kind kinds[MAX_KINDS];
    unsigned nkinds;
    char first_wrong[EXAMPLE_LEN];
    char first_duplicate[EXAMPLE_LEN];
};

struct chaos;

struct conn {
    struct chaos *ch;
    mqrpc_client *client;
    pthread_t thread;
    uint64_t rng;
    unsigned active;         /* calls in flight */
    int64_t backoff_until;   /* after a refused call: send nothing before */
    int64_t drain_until;     /* set once sending is over */
    uint64_t attempts;       /* calls started or refused, for --rate */
    bool no_more;            /* the call budget is spent */
    struct tally t;
    mqrpc_client_stats stats;
    /* the first correct answer after each node kill, on this connection */
    unsigned marks_seen;
    int64_t last_sent_us;
    int64_t first_after_mark[MAX_MARKS];
    unsigned qmarks_seen[NQUEUES];
    /* for the progress line, read by the main thread */
    atomic_ullong made, correct, errors;
};

struct chaos {
    struct call *calls;
    long ncalls;
    atomic_long next_call;
    atomic_int stop_sending;
    atomic_uint finished; /* connection threads done */
    unsigned nconn, inflight;
    double rate_per_conn; /* calls per second; 0: as fast as answered */
    int timeout_ms;
    mqrpc_client_opts copts;
    struct person *people;
    size_t npeople;
    uint8_t queues[NQUEUES]; /* --services: the ones called, in turn */
    unsigned nqueues;
    int64_t t0_us;
    struct conn *conns;
};

/* Times of the broker restart and what followed; 0 means "not yet". */
static atomic_llong usr1_us, usr2_us;
static atomic_llong first_correct_after_usr2_us; /* completed after USR2 */
static atomic_llong first_sent_after_usr2_us;    /* sent after USR2 */
static atomic_llong last_correct_us, longest_gap_us, last_done_us;
static volatile sig_atomic_t interrupted;
/* Node kills (SIGRTMIN), in order; only the main thread takes signals. */
static atomic_llong mark_us[MAX_MARKS];
static atomic_uint nmarks;
/* The first correct answer of each service after each node kill. */
static atomic_llong mark_queue_first_us[MAX_MARKS][NQUEUES];
/* The last call sent, per service: one not called after a kill (the run
 * was ending) has no gap to report. */
static atomic_llong queue_last_sent_us[NQUEUES];

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* clock_gettime is async-signal-safe, so the handler can keep the exact
 * moment instead of a flag polled later. */
static void on_restart_signal(int sig)
{
    atomic_store(sig == SIGUSR1 ? &usr1_us : &usr2_us, now_us());
}

static void on_mark_signal(int sig)
{
    unsigned i = atomic_load(&nmarks);

    (void)sig;
    if (i < MAX_MARKS) {
        atomic_store(&mark_us[i], now_us());
        atomic_store(&nmarks, i + 1);
    }
}

static void on_stop_signal(int sig)
{
    (void)sig;
    interrupted = 1;
}

static void atomic_min_set(atomic_llong *a, int64_t v)
{
    long long cur = atomic_load(a);
    while ((cur == 0 || v < cur) &&
           !atomic_compare_exchange_weak(a, &cur, (long long)v))
        ;
}

static void atomic_max_set(atomic_llong *a, int64_t v)
{
    long long cur = atomic_load(a);
    while (v > cur && !atomic_compare_exchange_weak(a, &cur, (long long)v))
        ;
}

static void nap_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* xorshift64*: cheap, and each connection has its own state. */
static uint64_t rnd(struct conn *cn)
{
    cn->rng ^= cn->rng >> 12;
    cn->rng ^= cn->rng << 25;
    cn->rng ^= cn->rng >> 27;
    return cn->rng * 2685821657736338717ULL;
}

static int64_t rnd_range(struct conn *cn, int64_t lo, int64_t hi)
{
    return lo + (int64_t)(rnd(cn) % (uint64_t)(hi - lo + 1));
}

/* ------------------------------------------------------------ accounting */

/* Counts n errors of kind name; msg (may be NULL) is kept as its example. */
static void tally_add(struct tally *t, const char *name, uint64_t n,
                      const char *msg)
{
    unsigned i;

    for (i = 0; i < t->nkinds; i++)
        if (strcmp(t->kinds[i].name, name) == 0)
            break;
    if (i == t->nkinds) {
        if (t->nkinds == MAX_KINDS)
            i = MAX_KINDS - 1; /* never in practice: lumped with the last */
        else
            snprintf(t->kinds[t->nkinds++].name, sizeof t->kinds[0].name,
                     "%s", name);
    }
    if (!t->kinds[i].n && msg)
        snprintf(t->kinds[i].example, EXAMPLE_LEN, "%s", msg);
    t->kinds[i].n += n;
}

static void tally_error(struct tally *t, const char *name, const char *msg)
{
    tally_add(t, name, 1, msg);
}

static uint64_t tally_errors(const struct tally *t)
{
    uint64_t n = 0;
    for (unsigned i = 0; i < t->nkinds; i++)
        n += t->kinds[i].n;
    return n;
}

static void merge_tally(struct tally *into, const struct tally *t)
{
    into->sent += t->sent;
    into->refused += t->refused;
    into->correct += t->correct;
    into->wrong += t->wrong;
    into->lost += t->lost;
    into->duplicates += t->duplicates;
    into->canceled_after_lost += t->canceled_after_lost;
    for (unsigned i = 0; i < t->nkinds; i++)
        tally_add(into, t->kinds[i].name, t->kinds[i].n, t->kinds[i].example);
    if (!into->first_wrong[0])
        memcpy(into->first_wrong, t->first_wrong, EXAMPLE_LEN);
    if (!into->first_duplicate[0])
        memcpy(into->first_duplicate, t->first_duplicate, EXAMPLE_LEN);
}

/* The first correct answer after each node kill, per connection and per
 * service: a kill stalls the callers on the lost node and the services
 * whose queue lost its leader, not everyone. */
static void note_marks(struct conn *cn, const struct call *k, int64_t t)
{
    unsigned n = atomic_load(&nmarks), *q = &cn->qmarks_seen[k->queue];

    for (; cn->marks_seen < n; cn->marks_seen++) {
        if (atomic_load(&mark_us[cn->marks_seen]) > t)
            break;
        cn->first_after_mark[cn->marks_seen] = t;
    }
    for (; *q < n; (*q)++) {
        if (atomic_load(&mark_us[*q]) > t)
            break;
        atomic_min_set(&mark_queue_first_us[*q][k->queue], t);
    }
}

static void note_correct(struct conn *cn, const struct call *k, int64_t t)
{
    int64_t usr2 = atomic_load(&usr2_us);
    int64_t prev = atomic_exchange(&last_correct_us, t);

    cn->t.correct++;
    atomic_fetch_add_explicit(&cn->correct, 1, memory_order_relaxed);
    if (prev)
        atomic_max_set(&longest_gap_us, t - prev);
    if (usr2 && t >= usr2)
        atomic_min_set(&first_correct_after_usr2_us, t);
    if (usr2 && k->sent_us >= usr2)
        atomic_min_set(&first_sent_after_usr2_us, t);
    note_marks(cn, k, t);
}

static void note_wrong(struct conn *cn, const struct call *k,
                       const mqrpc_reply *r)
{
    size_t n = 0;
    const char *body = mqrpc_reply_body(r, &n);

    cn->t.wrong++;
    if (!cn->t.first_wrong[0])
        snprintf(cn->t.first_wrong, EXAMPLE_LEN, "%s (call #%ld) answered %.*s",
                 queue_names[k->queue], (long)(k - cn->ch->calls),
                 (int)(n > 120 ? 120 : n), body ? body : "nothing");
}

/* ---------------------------------------------------------- the requests */

/* Writes the body of call k into buf and fills in what its answer must be. */
static int make_body(struct conn *cn, struct call *k, long idx, char *buf,
                     size_t len)
{
    const struct chaos *ch = cn->ch;
    int n = 0;

    k->queue = ch->queues[idx % ch->nqueues];
    switch (k->queue) {
    case Q_SOMA: {
        int64_t a = rnd_range(cn, -1000000000, 1000000000);
        int64_t b = rnd_range(cn, -1000000000, 1000000000);
        k->expect = a + b;
        return snprintf(buf, len, "{\"a\":%lld,\"b\":%lld}", (long long)a,
                        (long long)b);
    }
    case Q_MEDIA:
        k->count = (uint8_t)rnd_range(cn, 1, MEDIA_MAX);
        k->expect = 0;
        n = snprintf(buf, len, "{\"numeros\":[");
        for (unsigned i = 0; i < k->count; i++) {
            int64_t x = rnd_range(cn, -1000, 1000);
            k->expect += x;
            n += snprintf(buf + n, len - (size_t)n, "%s%lld", i ? "," : "",
                          (long long)x);
        }
        return n + snprintf(buf + n, len - (size_t)n, "]}");
    case Q_BUSCA:
        /* A name nobody has: the remote not_found is the right answer. */
        if ((idx / ch->nqueues) % NOT_FOUND_EVERY == 0) {
            k->person = NOBODY;
            return snprintf(buf, len, "{\"nome\":\"Ninguém Caos %ld\"}", idx);
        }
        k->person = (uint16_t)(rnd(cn) % ch->npeople);
        return snprintf(buf, len, "{\"nome\":%s}",
                        ch->people[k->person].name_json);
    default:
        return snprintf(buf, len, "{}");
    }
}

static bool check_result(const struct chaos *ch, const struct call *k,
                         json_t *res)
{
    switch (k->queue) {
    case Q_SOMA:
        return json_is_integer(res) && json_integer_value(res) == k->expect;
    case Q_MEDIA: {
        double mean = (double)k->expect / k->count;
        return json_is_number(res) &&
               fabs(json_number_value(res) - mean) <=
                   1e-9 * fmax(1.0, fabs(mean));
    }
    case Q_BUSCA: {
        const struct person *p;
        json_t *idade = json_object_get(res, "idade");
        json_t *cidade = json_object_get(res, "cidade");
        if (k->person == NOBODY)
            return false; /* nobody has that name: an answer is wrong */
        p = &ch->people[k->person];
        return json_is_integer(idade) && json_integer_value(idade) == p->idade &&
               json_is_string(cidade) &&
               strcmp(json_string_value(cidade), p->cidade) == 0;
    }
    default: {
        json_t *pid = json_object_get(res, "pid");
        return json_is_integer(pid) && json_integer_value(pid) > 0;
    }
    }
}

/* Sorts a completed call into correct, wrong or an error kind. */
static void classify(struct conn *cn, const struct call *k,
                     const mqrpc_reply *r, int64_t t)
{
    mqrpc_err st = mqrpc_reply_status(r);
    const char *code = mqrpc_reply_error_code(r);
    char name[48], example[EXAMPLE_LEN];

    if (st == MQRPC_OK) {
        if (check_result(cn->ch, k, mqrpc_reply_result(r)))
            note_correct(cn, k, t);
        else
            note_wrong(cn, k, r);
        return;
    }
    if (st == MQRPC_EREMOTE && k->queue == Q_BUSCA &&
        strcmp(code, MQRPC_NOT_FOUND) == 0) {
        if (k->person == NOBODY)
            note_correct(cn, k, t);
        else
            note_wrong(cn, k, r); /* someone in the data was not found */
        return;
    }
    if (st == MQRPC_EREMOTE)
        snprintf(name, sizeof name, "remote:%s", code);
    else
        snprintf(name, sizeof name, "%s", mqrpc_errname(st));
    /* When it was sent says whether the restart or a kill explains it. */
    snprintf(example, sizeof example, "call #%ld sent at %.1f s: %s",
             (long)(k - cn->ch->calls),
             (double)(k->sent_us - cn->ch->t0_us) / 1e6,
             mqrpc_reply_error_message(r));
    tally_error(&cn->t, name, example);
    atomic_fetch_add_explicit(&cn->errors, 1, memory_order_relaxed);
}

/* ------------------------------------------------------ one connection */

static bool sending_over(struct conn *cn)
{
    return cn->no_more || atomic_load(&cn->ch->stop_sending);
}

/* With --rate: when cn may start its next call. Pacing makes the length
 * of a run, hence where the broker restart falls in it, predictable. */
static int64_t next_slot_us(const struct conn *cn)
{
    const struct chaos *ch = cn->ch;

    if (ch->rate_per_conn <= 0)
        return 0;
    return ch->t0_us + (int64_t)((double)cn->attempts * 1e6 /
                                 ch->rate_per_conn);
}

static void on_done(const mqrpc_reply *r, void *arg);

/* Starts the next call of the run on cn. False when it did not: the run
 * wants no more, the connection is backing off, or the client refused. */
static bool start_call(struct conn *cn)
{
    struct chaos *ch = cn->ch;
    char body[256];
    struct call *k;
    int64_t t = now_us();
    long idx;
    int len;
    mqrpc_err e;

    if (sending_over(cn) || t < cn->backoff_until || t < next_slot_us(cn))
        return false;
    idx = atomic_fetch_add(&ch->next_call, 1);
    if (idx >= ch->ncalls) {
        cn->no_more = true;
        return false;
    }
    cn->attempts++;
    k = &ch->calls[idx];
    k->conn = cn;
    k->sent_us = t;
    len = make_body(cn, k, idx, body, sizeof body);
    k->state = C_INFLIGHT;
    atomic_fetch_add_explicit(&cn->made, 1, memory_order_relaxed);
    e = mqrpc_call_async(cn->client, queue_names[k->queue], body, (size_t)len,
                         ch->timeout_ms, MQRPC_CALL_IDEMPOTENT, on_done, k);
    if (e != MQRPC_OK) {
        /* Disconnected and not due to reconnect yet: an explicit error,
         * and a pause, so an outage costs a few calls, not the budget. */
        char name[48], example[EXAMPLE_LEN];
        k->state = C_REFUSED;
        cn->t.refused++;
        snprintf(name, sizeof name, "refused:%s", mqrpc_errname(e));
        snprintf(example, sizeof example, "call #%ld at %.1f s: %s", idx,
                 (double)(t - ch->t0_us) / 1e6,
                 mqrpc_client_errmsg(cn->client));
        tally_error(&cn->t, name, example);
        atomic_fetch_add_explicit(&cn->errors, 1, memory_order_relaxed);
        cn->backoff_until = t + REFUSED_BACKOFF_US;
        return false;
    }
    cn->t.sent++;
    cn->active++;
    cn->last_sent_us = t;
    atomic_max_set(&queue_last_sent_us[k->queue], t);
    return true;
}

static void fill(struct conn *cn)
{
    while (cn->active < cn->ch->inflight && start_call(cn))
        ;
}

static void on_done(const mqrpc_reply *r, void *arg)
{
    struct call *k = arg;
    struct conn *cn = k->conn;
    mqrpc_err st = mqrpc_reply_status(r);
    int64_t t = now_us();

    if (k->state != C_INFLIGHT) {
        if (k->state == C_LOST) {
            cn->t.canceled_after_lost++;
            return;
        }
        cn->t.duplicates++;
        if (!cn->t.first_duplicate[0])
            snprintf(cn->t.first_duplicate, EXAMPLE_LEN,
                     "call #%ld to %s completed again (%s)",
                     (long)(k - cn->ch->calls), queue_names[k->queue],
                     st == MQRPC_OK ? "ok" : mqrpc_reply_error_code(r));
        return;
    }
    k->state = C_DONE;
    cn->active--;
    atomic_max_set(&last_done_us, t);
    classify(cn, k, r, t);
    /* After a transport failure the loop refills, not this callback: the
     * library may be failing every call at once, from inside a call. */
    if (st == MQRPC_OK || st == MQRPC_EREMOTE)
        fill(cn);
}

/* Calls still in flight after the drain are lost; the library's cleanup
 * in mqrpc_client_free must not count them again. Runs once every
 * connection thread has ended, since it reads every call's record. */
static void mark_lost(struct conn *cn)
{
    struct chaos *ch = cn->ch;
    long made = atomic_load(&ch->next_call);

    if (made > ch->ncalls)
        made = ch->ncalls;
    for (long i = 0; i < made; i++) {
        struct call *k = &ch->calls[i];
        if (k->conn == cn && k->state == C_INFLIGHT) {
            k->state = C_LOST;
            cn->t.lost++;
        }
    }
}

static void *run_conn(void *arg)
{
    struct conn *cn = arg;
    struct chaos *ch = cn->ch;

    for (;;) {
        int64_t t;
        int wait = 50;
        mqrpc_err e;

        fill(cn);
        t = now_us();
        if (sending_over(cn)) {
            if (!cn->drain_until)
                cn->drain_until =
                    t + (int64_t)ch->timeout_ms * 1000 + DRAIN_GRACE_US;
            if (cn->active == 0 || t >= cn->drain_until)
                break;
        } else if (cn->active < ch->inflight) {
            /* a slot is free: wake when the next call may start */
            int64_t at = cn->backoff_until > next_slot_us(cn)
                             ? cn->backoff_until
                             : next_slot_us(cn);
            if (at > t && at - t < (int64_t)wait * 1000)
                wait = (int)((at - t + 999) / 1000);
        }
        e = mqrpc_client_process(cn->client, wait);
        if (e != MQRPC_OK && e != MQRPC_ETIMEOUT)
            nap_ms(DOWN_NAP_MS); /* down: process returns at once */
    }
    atomic_fetch_add(&ch->finished, 1);
    return NULL;
}

/* After the threads: what is lost, the library's counts, and the client
 * (whose cleanup completes the lost calls with ECANCELED). */
static void finish_conn(struct conn *cn)
{
    mark_lost(cn);
    mqrpc_client_get_stats(cn->client, &cn->stats, sizeof cn->stats);
    mqrpc_client_free(cn->client);
    cn->client = NULL;
}

/* ----------------------------------------------------------------- data */

static void free_people(struct chaos *ch)
{
    for (size_t i = 0; i < ch->npeople; i++) {
        free(ch->people[i].name_json);
        free(ch->people[i].cidade);
    }
    free(ch->people);
    ch->people = NULL;
    ch->npeople = 0;
}

/* Loads busca's data file: the answers the service must give. */
static bool load_people(struct chaos *ch, const char *path, char *err,
                        size_t errlen)
{
    json_error_t je;
    json_t *a = json_load_file(path, 0, &je), *v;
    size_t i;

    if (!json_is_array(a) || json_array_size(a) == 0 ||
        json_array_size(a) >= NOBODY) {
        snprintf(err, errlen, "%s: %s", path,
                 a ? "not a non-empty array of people" : je.text);
        json_decref(a);
        return false;
    }
    ch->people = calloc(json_array_size(a), sizeof *ch->people);
    if (!ch->people) {
        snprintf(err, errlen, "out of memory");
        json_decref(a);
        return false;
    }
    json_array_foreach(a, i, v) {
        json_t *nome = json_object_get(v, "nome");
        json_t *idade = json_object_get(v, "idade");
        json_t *cidade = json_object_get(v, "cidade");
        struct person *p = &ch->people[ch->npeople];
        if (!json_is_string(nome) || !json_is_integer(idade) ||
            !json_is_string(cidade)) {
            snprintf(err, errlen, "%s: entry %zu is not {nome, idade, cidade}",
                     path, i);
            json_decref(a);
            return false;
        }
        p->name_json = json_dumps(nome, JSON_ENCODE_ANY);
        p->cidade = strdup(json_string_value(cidade));
        p->idade = json_integer_value(idade);
        ch->npeople++;
        if (!p->name_json || !p->cidade || strlen(p->name_json) > 150) {
            snprintf(err, errlen, "%s: entry %zu: out of memory or too long",
                     path, i);
            json_decref(a);
            return false;
        }
    }
    json_decref(a);
    return true;
}

/* -------------------------------------------------------------- report */

struct figures {
    struct tally t;
    uint64_t made, errors, dropped, retried, conn_lost, reconnects;
    double secs, calls_per_s;
    double outage_s, recovery_s, gap_s; /* < 0: not measured */
    bool restarted;
    unsigned failed; /* bit per invariant */
    unsigned nmarks;
    /* per node kill: until every connection and every service called had
     * a correct answer again; < 0: one never had */
    double mark_at_s[MAX_MARKS], mark_gap_s[MAX_MARKS];
    double mark_conn_s[MAX_MARKS], mark_queue_s[MAX_MARKS];
};

enum { F_LOST = 1, F_DUPLICATE = 2, F_WRONG = 4, F_ACCOUNTING = 8 };

static double since_usr(atomic_llong *what, atomic_llong *base)
{
    int64_t w = atomic_load(what), b = atomic_load(base);
    return w && b ? (double)(w - b) / 1e6 : -1;
}

static void gather_marks(const struct chaos *ch, struct figures *f)
{
    f->nmarks = atomic_load(&nmarks);
    for (unsigned m = 0; m < f->nmarks; m++) {
        int64_t at = atomic_load(&mark_us[m]), conn = 0, queue = 0;
        bool never = false;
        for (unsigned i = 0; i < ch->nconn; i++) {
            int64_t first = ch->conns[i].first_after_mark[m];
            if (!first && ch->conns[i].last_sent_us < at)
                continue; /* sent nothing after the kill */
            if (!first)
                never = true;
            else if (first - at > conn)
                conn = first - at;
        }
        for (unsigned j = 0; j < ch->nqueues; j++) {
            int64_t first = atomic_load(&mark_queue_first_us[m][ch->queues[j]]);
            if (!first && atomic_load(&queue_last_sent_us[ch->queues[j]]) < at)
                continue;
            if (!first)
                never = true;
            else if (first - at > queue)
                queue = first - at;
        }
        f->mark_at_s[m] = (double)(at - ch->t0_us) / 1e6;
        f->mark_conn_s[m] = (double)conn / 1e6;
        f->mark_queue_s[m] = (double)queue / 1e6;
        f->mark_gap_s[m] = never ? -1 : (double)(conn > queue ? conn : queue) / 1e6;
    }
}

static void gather(struct chaos *ch, struct figures *f)
{
    int64_t end = atomic_load(&last_done_us);

    memset(f, 0, sizeof *f);
    for (unsigned i = 0; i < ch->nconn; i++) {
        const struct conn *cn = &ch->conns[i];
        merge_tally(&f->t, &cn->t);
        f->dropped += cn->stats.dropped;
        f->retried += cn->stats.retried;
        f->conn_lost += cn->stats.lost;
        f->reconnects += cn->stats.reconnects;
    }
    f->made = f->t.sent + f->t.refused;
    f->errors = tally_errors(&f->t);
    f->secs = end > ch->t0_us ? (double)(end - ch->t0_us) / 1e6 : 0;
    f->calls_per_s = f->secs > 0 ? (double)f->t.correct / f->secs : 0;
    f->restarted = atomic_load(&usr1_us) != 0;
    f->outage_s = since_usr(&first_correct_after_usr2_us, &usr1_us);
    f->recovery_s = since_usr(&first_sent_after_usr2_us, &usr2_us);
    f->gap_s = (double)atomic_load(&longest_gap_us) / 1e6;
    gather_marks(ch, f);
    if (f->t.lost)
        f->failed |= F_LOST;
    if (f->t.duplicates)
        f->failed |= F_DUPLICATE;
    if (f->t.wrong)
        f->failed |= F_WRONG;
    if (f->t.correct + f->t.wrong + f->errors + f->t.lost != f->made)
        f->failed |= F_ACCOUNTING;
}

/* Prints the transport failures a chaos run is about first, even at 0,
 * then whatever else occurred. Names from the library's table, which may
 * rename them. */
static void print_errors(const struct tally *t, uint64_t errors)
{
    const char *const fixed[] = {mqrpc_errname(MQRPC_ECLOSED),
                                 mqrpc_errname(MQRPC_EOVERLOAD),
                                 mqrpc_errname(MQRPC_ETIMEOUT)};
    bool shown[MAX_KINDS] = {false};

    printf("errors: %llu (", (unsigned long long)errors);
    for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++) {
        uint64_t n = 0;
        for (unsigned j = 0; j < t->nkinds; j++)
            if (strcmp(t->kinds[j].name, fixed[i]) == 0) {
                n = t->kinds[j].n;
                shown[j] = true;
            }
        printf("%s%s %llu", i ? ", " : "", fixed[i], (unsigned long long)n);
    }
    for (unsigned j = 0; j < t->nkinds; j++)
        if (!shown[j])
            printf(", %s %llu", t->kinds[j].name,
                   (unsigned long long)t->kinds[j].n);
    printf(")\n");
}

static void print_seconds(const char *label, double s, const char *none)
{
    if (s >= 0)
        printf("%s: %.1f s\n", label, s);
    else
        printf("%s: %s\n", label, none);
}

static void print_text(const struct chaos *ch, const struct figures *f,
                       bool verbose)
{
    const struct tally *t = &f->t;

    printf("rpc_chaos: %u connection%s x %u in flight, timeout %d ms, "
           "retries %d%s",
           ch->nconn, ch->nconn == 1 ? "" : "s", ch->inflight, ch->timeout_ms,
           ch->copts.retries, ch->copts.durable ? ", durable" : "");
    if (ch->rate_per_conn > 0)
        printf(", at most %.0f calls/s", ch->rate_per_conn * ch->nconn);
    printf("\n");
    printf("calls sent: %llu (accepted %llu, refused at once %llu)\n",
           (unsigned long long)f->made, (unsigned long long)t->sent,
           (unsigned long long)t->refused);
    printf("answered: %llu (correct %llu, wrong %llu)\n",
           (unsigned long long)(t->correct + t->wrong),
           (unsigned long long)t->correct, (unsigned long long)t->wrong);
    print_errors(t, f->errors);
    printf("lost: %llu\n", (unsigned long long)t->lost);
    printf("duplicate replies delivered: %llu\n",
           (unsigned long long)t->duplicates);
    printf("duplicate replies dropped by the library: %llu\n",
           (unsigned long long)f->dropped);
    printf("retried: %llu, connections lost: %llu, regained: %llu\n",
           (unsigned long long)f->retried, (unsigned long long)f->conn_lost,
           (unsigned long long)f->reconnects);
    if (f->restarted) {
        print_seconds("outage during the broker restart", f->outage_s,
                      "no correct answer after the broker came back");
        print_seconds("recovery after broker restart", f->recovery_s,
                      "no correct answer to a call sent after it");
    } else {
        printf("recovery after broker restart: no restart signalled\n");
    }
    printf("longest gap between correct answers: %.1f s\n", f->gap_s);
    for (unsigned m = 0; m < f->nmarks; m++) {
        if (f->mark_gap_s[m] < 0)
            printf("node kill %u at %.1f s: some connection or service had no "
                   "correct answer after it\n",
                   m + 1, f->mark_at_s[m]);
        else
            printf("node kill %u at %.1f s: answers resumed after %.2f s "
                   "(slowest connection %.2f s, slowest service %.2f s)\n",
                   m + 1, f->mark_at_s[m], f->mark_gap_s[m], f->mark_conn_s[m],
                   f->mark_queue_s[m]);
    }
    printf("throughput: %.0f calls/s (correct answers over %.1f s)\n",
           f->calls_per_s, f->secs);
    if (t->first_wrong[0])
        printf("first wrong answer: %s\n", t->first_wrong);
    if (t->first_duplicate[0])
        printf("first duplicate: %s\n", t->first_duplicate);
    if (!verbose)
        return;
    if (f->restarted)
        printf("  broker restart signalled at %.1f s, up again at %.1f s\n",
               (double)(atomic_load(&usr1_us) - ch->t0_us) / 1e6,
               atomic_load(&usr2_us)
                   ? (double)(atomic_load(&usr2_us) - ch->t0_us) / 1e6
                   : -1.0);
    for (unsigned j = 0; j < t->nkinds; j++)
        printf("  %s, first: %s\n", t->kinds[j].name, t->kinds[j].example);
}

static json_t *json_seconds(double s)
{
    return s >= 0 ? json_real(s) : json_null();
}

static bool write_report(const struct chaos *ch, const struct figures *f,
                         const char *path)
{
    json_t *o = json_object(), *kinds = json_object(), *failed = json_array();
    const struct tally *t = &f->t;
    bool ok;

    for (unsigned j = 0; j < t->nkinds; j++)
        json_object_set_new(kinds, t->kinds[j].name,
                            json_integer((json_int_t)t->kinds[j].n));
    if (f->failed & F_LOST)
        json_array_append_new(failed, json_string("lost"));
    if (f->failed & F_DUPLICATE)
        json_array_append_new(failed, json_string("duplicates_delivered"));
    if (f->failed & F_WRONG)
        json_array_append_new(failed, json_string("wrong"));
    if (f->failed & F_ACCOUNTING)
        json_array_append_new(failed, json_string("accounting"));
#define SET_INT(k, v) json_object_set_new(o, k, json_integer((json_int_t)(v)))
    SET_INT("connections", ch->nconn);
    SET_INT("inflight", ch->inflight);
    SET_INT("timeout_ms", ch->timeout_ms);
    SET_INT("retries", ch->copts.retries);
    SET_INT("rate", ch->rate_per_conn * ch->nconn + 0.5);
    json_object_set_new(o, "durable", json_boolean(ch->copts.durable));
    SET_INT("calls", f->made);
    SET_INT("accepted", t->sent);
    SET_INT("refused", t->refused);
    SET_INT("answered", t->correct + t->wrong);
    SET_INT("correct", t->correct);
    SET_INT("wrong", t->wrong);
    SET_INT("errors", f->errors);
    json_object_set_new(o, "errors_by_kind", kinds);
    SET_INT("lost", t->lost);
    SET_INT("duplicates_delivered", t->duplicates);
    SET_INT("duplicates_dropped", f->dropped);
    SET_INT("retried", f->retried);
    SET_INT("connections_lost", f->conn_lost);
    SET_INT("connections_regained", f->reconnects);
#undef SET_INT
    json_object_set_new(o, "broker_restarted", json_boolean(f->restarted));
    json_object_set_new(o, "outage_s", json_seconds(f->outage_s));
    json_object_set_new(o, "recovery_s", json_seconds(f->recovery_s));
    json_object_set_new(o, "longest_gap_s", json_real(f->gap_s));
    {
        json_t *kills = json_array();
        for (unsigned m = 0; m < f->nmarks; m++) {
            json_t *k = json_object();
            json_object_set_new(k, "at_s", json_real(f->mark_at_s[m]));
            json_object_set_new(k, "gap_s", json_seconds(f->mark_gap_s[m]));
            json_array_append_new(kills, k);
        }
        json_object_set_new(o, "node_kills", kills);
    }
    json_object_set_new(o, "seconds", json_real(f->secs));
    json_object_set_new(o, "calls_per_s", json_real(f->calls_per_s));
    json_object_set_new(o, "ok", json_boolean(f->failed == 0));
    json_object_set_new(o, "failed", failed);
    ok = json_dump_file(o, path, JSON_INDENT(2)) == 0;
    json_decref(o);
    return ok;
}

/* Names each broken invariant on stderr; true if all hold. */
static bool check_invariants(const struct cli *c, const struct figures *f)
{
    const struct tally *t = &f->t;

    if (f->failed & F_LOST)
        cli_error(c, "FAILED: %llu call(s) never completed (lost)",
                  (unsigned long long)t->lost);
    if (f->failed & F_DUPLICATE)
        cli_error(c, "FAILED: %llu duplicate(s) delivered to the caller: %s",
                  (unsigned long long)t->duplicates, t->first_duplicate);
    if (f->failed & F_WRONG)
        cli_error(c, "FAILED: %llu wrong answer(s): %s",
                  (unsigned long long)t->wrong, t->first_wrong);
    if (f->failed & F_ACCOUNTING)
        cli_error(c, "FAILED: outcomes do not add up to the calls made");
    return f->failed == 0;
}

/* ----------------------------------------------------------------- main */

static void progress(const struct chaos *ch, int64_t t)
{
    unsigned long long made = 0, correct = 0, errors = 0, inflight;

    for (unsigned i = 0; i < ch->nconn; i++) {
        made += atomic_load_explicit(&ch->conns[i].made, memory_order_relaxed);
        correct +=
            atomic_load_explicit(&ch->conns[i].correct, memory_order_relaxed);
        errors +=
            atomic_load_explicit(&ch->conns[i].errors, memory_order_relaxed);
    }
    inflight = made - correct - errors; /* wrong answers included */
    fprintf(stderr,
            "rpc_chaos: %.0f s: %llu calls, %llu correct, %llu errors, %llu "
            "in flight or wrong\n",
            (double)(t - ch->t0_us) / 1e6, made, correct, errors, inflight);
}

/* Waits for the connection threads, stopping the sending at the time
 * bound or on SIGINT/SIGTERM. */
static void supervise(struct chaos *ch, long max_seconds)
{
    int64_t next_progress = ch->t0_us + PROGRESS_US;

    while (atomic_load(&ch->finished) < ch->nconn) {
        int64_t t;
        nap_ms(100);
        t = now_us();
        if (!atomic_load(&ch->stop_sending) &&
            (interrupted || t - ch->t0_us >= (int64_t)max_seconds * 1000000)) {
            fprintf(stderr, "rpc_chaos: %s: no more calls, waiting for the "
                            "ones in flight\n",
                    interrupted ? "interrupted" : "time bound reached");
            atomic_store(&ch->stop_sending, 1);
        }
        if (t >= next_progress) {
            progress(ch, t);
            next_progress += PROGRESS_US;
        }
    }
}

static void install_restart_signals(void)
{
    struct sigaction sa;

    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_restart_signal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGUSR2, &sa, NULL);
    sa.sa_handler = on_mark_signal;
    sigaction(SIGRTMIN, &sa, NULL);
}

/* Connects every client before the clock starts; the status of the first
 * failure, or MQRPC_OK. */
static mqrpc_err connect_all(struct chaos *ch, const struct cli *c)
{
    for (unsigned i = 0; i < ch->nconn; i++) {
        struct conn *cn = &ch->conns[i];
        mqrpc_err e;
        mqrpc_client_opts o = ch->copts;
        o.log_arg = cn;
        cn->client = mqrpc_client_new(&o);
        if (!cn->client) {
            cli_error(c, "out of memory");
            return MQRPC_ENOMEM;
        }
        e = mqrpc_client_connect(cn->client);
        if (e != MQRPC_OK) {
            cli_error(c, "%s%s", mqrpc_client_errmsg(cn->client),
                      cli_connect_hint(e));
            return e;
        }
    }
    return MQRPC_OK;
}

/* Runs the connection threads with the stop and restart signals blocked,
 * so that they reach the main thread, asleep in supervise(). */
static bool run_all(struct chaos *ch, const struct cli *c, long max_seconds)
{
    sigset_t block, old;
    unsigned started = 0;

    sigemptyset(&block);
    sigaddset(&block, SIGUSR1);
    sigaddset(&block, SIGUSR2);
    sigaddset(&block, SIGRTMIN);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &block, &old);
    ch->t0_us = now_us();
    for (; started < ch->nconn; started++)
        if (pthread_create(&ch->conns[started].thread, NULL, run_conn,
                           &ch->conns[started]))
            break;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (started < ch->nconn) {
        cli_error(c, "cannot start a thread");
        atomic_store(&ch->stop_sending, 1);
    } else {
        supervise(ch, max_seconds);
    }
    for (unsigned i = 0; i < started; i++)
        pthread_join(ch->conns[i].thread, NULL);
    for (unsigned i = 0; i < ch->nconn; i++)
        finish_conn(&ch->conns[i]);
    return started == ch->nconn;
}

/* --services soma,media: the queues called, each once, in that order. */
static bool parse_services(struct chaos *ch, const char *list, char *err,
                           size_t errlen)
{
    const char *p = list;

    ch->nqueues = 0;
    while (*p) {
        size_t len = strcspn(p, ",");
        unsigned q;
        for (q = 0; q < NQUEUES; q++)
            if (strlen(queue_names[q]) == len + 8 &&
                strncmp(queue_names[q] + 8, p, len) == 0)
                break;
        if (q == NQUEUES) {
            snprintf(err, errlen,
                     "--services: unknown service \"%.*s\" (soma, media, "
                     "busca, info)",
                     (int)(len > 40 ? 40 : len), p);
            return false;
        }
        for (unsigned j = 0; j < ch->nqueues; j++)
            if (ch->queues[j] == q) {
                snprintf(err, errlen, "--services: %.*s twice", (int)len, p);
                return false;
            }
        ch->queues[ch->nqueues++] = (uint8_t)q;
        p += len;
        if (*p == ',' && *++p == '\0')
            break; /* a trailing comma: caught below as empty */
    }
    if (!ch->nqueues || p[-1] == ',') {
        snprintf(err, errlen, "--services: a comma list of soma, media, "
                              "busca, info");
        return false;
    }
    return true;
}

static void free_chaos(struct chaos *ch)
{
    if (ch->conns)
        for (unsigned i = 0; i < ch->nconn; i++)
            mqrpc_client_free(ch->conns[i].client);
    free(ch->conns);
    free(ch->calls);
    free_people(ch);
}

enum {
    X_CALLS,
    X_CONNS,
    X_INFLIGHT,
    X_TIMEOUT,
    X_RETRIES,
    X_DURABLE,
    X_MAX_SECONDS,
    X_RATE,
    X_REPORT,
    X_DATA,
    X_SERVICES,
    X_END
};

static long xval(const struct cli_extra *x, int i)
{
    return atol(x[i].value); /* ranges were checked by cli_parse */
}

/* The library's own account of each connection (lost, regained, blocked),
 * with the run's clock, so a failure in the report can be matched with
 * what the connection went through. */
static void log_line(mqrpc_log_level level, const char *line, void *arg)
{
    struct conn *cn = arg;
    (void)level;
    fprintf(stderr, "rpc_chaos: %.1f s: connection %ld: %s\n",
            (double)(now_us() - cn->ch->t0_us) / 1e6,
            (long)(cn - cn->ch->conns) + 1, line);
}

int main(int argc, char **argv)
{
    struct cli_extra extra[] = {
        [X_CALLS] = {.name = "calls", .arg = "N", .short_name = 'n',
                     .help = "calls in all", .value = "100000", .min = 1,
                     .max = MAX_CALLS},
        [X_CONNS] = {.name = "connections", .arg = "C",
                     .help = "connections, one thread each", .value = "4",
                     .min = 1, .max = MAX_CONNECTIONS},
        [X_INFLIGHT] = {.name = "inflight", .arg = "K",
                        .help = "calls in flight per connection",
                        .value = "16", .min = 1, .max = MAX_INFLIGHT},
        [X_TIMEOUT] = {.name = "timeout", .arg = "MS",
                       .help = "timeout of each call", .value = "30000",
                       .min = 1, .max = 86400000L},
        [X_RETRIES] = {.name = "retries", .arg = "N",
                       .help = "re-sends of a call after a lost connection",
                       .value = "3", .min = 0, .max = 1000},
        [X_DURABLE] = {.name = "durable",
                       .help = "persistent requests, durable reply queue"},
        [X_MAX_SECONDS] = {.name = "max-seconds", .arg = "S",
                           .help = "stop sending after S seconds",
                           .value = "900", .min = 1, .max = 86400},
        [X_RATE] = {.name = "rate", .arg = "N",
                     .help = "at most N calls per second in all; 0: no limit",
                     .value = "0", .min = 0, .max = 10000000L},
        [X_REPORT] = {.name = "report", .arg = "FILE",
                      .help = "also write the figures there, as JSON"},
        [X_DATA] = {.name = "data", .arg = "PATH",
                    .help = "busca's people, for checking its answers",
                    .value = CHAOS_PEOPLE_FILE},
        [X_SERVICES] = {.name = "services", .arg = "LIST",
                        .help = "the services called, in turn (comma list)",
                        .value = "soma,media,busca,info"},
        [X_END] = {.name = NULL},
    };
    struct cli c = {
        .prog = "rpc_chaos",
        .usage = "[OPTIONS]",
        .summary =
            "Sends --calls calls round-robin to service_soma, service_media, "
            "service_busca and service_info, checks every answer and accounts "
            "for every call: correct, wrong, explicit error by kind, lost "
            "(never completed) or completed twice. SIGUSR1 marks the start of "
            "a broker restart and SIGUSR2 its end, for the recovery figures; "
            "SIGRTMIN marks a node kill on a cluster, for the gap after it; "
            "SIGINT/SIGTERM stop the sending early. Used by scripts/chaos.sh.",
        .verbose_help = "show an example message for each error kind",
        .exit_codes = "Exit codes: 0 no call lost, duplicated or answered "
                      "wrongly, 1 an invariant failed\n"
                      "            (named on stderr), 2 usage, 3 broker "
                      "unreachable at start,\n"
                      "            6 other failure.\n",
        .extra = extra,
    };
    struct chaos ch;
    struct figures f;
    char err[512];
    mqrpc_err e;
    int rc;

    memset(&ch, 0, sizeof ch);
    rc = cli_parse(&c, argc, argv);
    if (rc >= 0)
        return rc;
    if (c.optind < argc) {
        cli_error(&c, "unexpected argument \"%s\" (try --help)",
                  argv[c.optind]);
        return CLI_EXIT_USAGE;
    }
    ch.ncalls = xval(extra, X_CALLS);
    ch.nconn = (unsigned)xval(extra, X_CONNS);
    ch.inflight = (unsigned)xval(extra, X_INFLIGHT);
    ch.timeout_ms = (int)xval(extra, X_TIMEOUT);
    ch.rate_per_conn = (double)xval(extra, X_RATE) / ch.nconn;
    mqrpc_client_opts_init(&ch.copts);
    ch.copts.log = log_line;
    ch.copts.url = c.url;
    ch.copts.tls = c.tls;
    ch.copts.heartbeat_s = c.heartbeat_s;
    ch.copts.retries = (int)xval(extra, X_RETRIES);
    ch.copts.durable = extra[X_DURABLE].value != NULL;

    if (!parse_services(&ch, extra[X_SERVICES].value, err, sizeof err) ||
        !load_people(&ch, extra[X_DATA].value, err, sizeof err)) {
        cli_error(&c, "%s", err);
        free_chaos(&ch);
        return CLI_EXIT_USAGE;
    }
    ch.calls = calloc((size_t)ch.ncalls, sizeof *ch.calls);
    ch.conns = calloc(ch.nconn, sizeof *ch.conns);
    if (!ch.calls || !ch.conns) {
        cli_error(&c, "out of memory");
        free_chaos(&ch);
        return CLI_EXIT_FAILURE;
    }
    for (unsigned i = 0; i < ch.nconn; i++) {
        struct conn *cn = &ch.conns[i];
        cn->ch = &ch;
        cn->rng = ((uint64_t)now_us() << 16) ^ ((uint64_t)getpid() << 8) ^
                  (i + 1) * 0x9e3779b97f4a7c15ULL;
        if (!cn->rng)
            cn->rng = 1;
    }

    cli_on_stop_signals(on_stop_signal);
    install_restart_signals();
    e = connect_all(&ch, &c);
    if (e != MQRPC_OK) {
        free_chaos(&ch);
        return cli_exit_code(e);
    }
    if (!run_all(&ch, &c, xval(extra, X_MAX_SECONDS))) {
        free_chaos(&ch);
        return CLI_EXIT_FAILURE;
    }

    gather(&ch, &f);
    print_text(&ch, &f, c.verbose);
    fflush(stdout);
    rc = check_invariants(&c, &f) ? CLI_EXIT_OK : CLI_EXIT_REMOTE;
    if (extra[X_REPORT].value &&
        !write_report(&ch, &f, extra[X_REPORT].value)) {
        cli_error(&c, "cannot write %s", extra[X_REPORT].value);
        if (rc == CLI_EXIT_OK)
            rc = CLI_EXIT_FAILURE;
    }
    free_chaos(&ch);
    return rc;
}
