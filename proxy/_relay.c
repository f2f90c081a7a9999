/*
 * proxy._relay: the byte relay of unrestricted plaintext sessions, in a C thread.
 *
 * An unrestricted session forwards what each side sends unchanged; Topeng only walks the
 * message headers (counts, limits, the transaction status, DDL command tags, errors). In
 * Python that costs one event-loop callback per chunk in each direction. Here one thread per
 * process, with its own epoll set, reads a chunk from one socket, walks its headers exactly as
 * proxy.wire.framing.MessageScanner does, and writes it to the other socket, without the GIL.
 *
 * A session is handed over by the event loop (Relay.add) with its two sockets (the asyncio
 * transports stop reading but stay open and own the descriptors) and the state of its two
 * scanners. The thread hands it back, with the state, whenever anything needs Python:
 *
 *   - a chunk with a message the scanner watches (ErrorResponse, CopyInResponse), a DDL
 *     CommandComplete, a ReadyForQuery of unusual length, a watched message split across
 *     chunks, or a header past the limits: the chunk comes back unforwarded and unscanned,
 *     so the Python path judges it from the same state, byte for byte;
 *   - end of stream or an error on either socket, on read or write.
 *
 * Bytes read and scanned but not yet written (a slow reader) come back too, to be written
 * before anything else. The event loop can take a session back at any time (Relay.recall:
 * shutdown, idle timeout, teardown) and read its counters without taking it back (Relay.peek).
 * Hand-backs are announced on an eventfd the event loop watches (Relay.fileno, Relay.take).
 *
 * A restricted session may be handed over GATED (Relay.add with a gate): then the thread
 * forwards only what the Python policy approved in advance, and hands back everything else
 * before forwarding it. What it forwards on its own is the common round
 * trip: a client chunk that is exactly Bind (unnamed portal, an approved statement, the
 * approved result formats), Describe of that portal (or none, if the approval allows it),
 * Execute and Sync, or one Query that fills an approved template, sent while nothing is in
 * flight; and a server chunk that is exactly its whole reply: BindComplete (not for a Query),
 * the approved RowDescription byte for byte (unless there was no Describe), no more DataRows
 * than the approval allows, a SELECT CommandComplete (or PortalSuspended, when exactly the
 * Execute's row count came) and ReadyForQuery with the transaction status it had ('I', or 'T'
 * inside a transaction block). A COMMAND approval is a transaction-control statement (BEGIN,
 * COMMIT, ROLLBACK, ...) sent as exactly the approved Query text, whose reply must be exactly
 * the approved CommandComplete and a ReadyForQuery 'I' or 'T'. The thread keeps the transaction
 * status, and which approval last bound the unnamed portal (it outlives a round trip inside a
 * transaction block), and reports both, so the session knows them as if it had seen the
 * replies. The policy approves a
 * statement only once it has seen that very RowDescription pass unmasked, so the rows of such
 * a reply need no masking. A request handed back while one is in flight (or a reply that is
 * not of that shape) comes back with the in-flight request, which the Python session replays
 * (and checks) before it reads the chunk. Each round trip is counted per approval, with its
 * rows and its duration in a histogram, for the metrics.
 *
 * A gate may carry a BUDGET: statements and rows the policy charged to the user's rate limits
 * ahead (proxy/policy/engine.py, reserve_gate), and a deadline (the end of the rate window they
 * were charged to). The thread forwards a request only while at least one statement and one
 * row are left and the deadline has not passed, and a reply only if its rows fit in what is
 * left and the deadline has not passed; the rest comes back, so the policy judges it against
 * the limiter itself, once the unused budget is given back.
 *
 * Locking: one mutex guards every session; the thread holds it while it handles a batch of
 * epoll events, the event loop while it calls in. The thread never touches Python objects.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (256 * 1024)       /* bytes read at a time, as uvloop does */
#define MAX_EVENTS 64
#define MAX_PREFIXES 16
#define MAX_PREFIX_LEN 64

enum { CLIENT = 0, SERVER = 1 };
enum { FREE = 0, ACTIVE = 1, RETURNED = 2 };

/* Why a session came back (Relay.take, Relay.recall). */
enum {
    BACK_RECALLED = 0,
    BACK_CHUNK = 1,      /* a chunk that needs the Python path (see chunk_side) */
    BACK_CLOSED = 2,     /* end of stream or an error reading `side` */
    BACK_WRITE_ERROR = 3 /* writing to `side` failed */
};

/* MessageScanner's state: what is left of a body, a split header, the last types seen. */
typedef struct {
    uint64_t skip;
    unsigned char head[5];
    int head_len;
    int partial_type, last_type, last_status, tag_seen;
} ScanState;

typedef struct {
    /* what to look for (copied from proxy.wire.framing.Limits and MessageScanner) */
    unsigned char allowed[256];
    unsigned char small[256];
    unsigned char watch[256];
    uint64_t small_limit; /* limits.small_limit + 4 */
    uint64_t big_limit;   /* limits.max_message + 4 */
    int status_type, tag_type;
    int nprefixes;
    size_t prefix_len[MAX_PREFIXES];
    unsigned char prefix[MAX_PREFIXES][MAX_PREFIX_LEN];
    ScanState st; /* where the stream is */
    /* since the last collect */
    uint64_t counts[256];
    uint64_t bytes;
} Scan;

typedef struct {
    int fd;
    uint32_t events; /* the epoll interest registered for fd */
    Scan scan;       /* of what is read from fd */
    char *out;       /* scanned bytes waiting to be written to fd */
    size_t out_len, out_off, out_cap;
} Side;

/* What fills a hole of a query template: an unsigned integer, or a plain string constant. */
enum { HOLE_END = 0, HOLE_INTEGER = 1, HOLE_STRING = 2 };

/* A statement the policy approved for the gate (see the header): a prepared statement (name
 * set), or a simple query's template (nsegments set). */
typedef struct {
    unsigned char *name;        /* the prepared statement's name */
    size_t name_len;
    unsigned char *formats;     /* the tail of Bind: result format count and codes */
    size_t formats_len;
    unsigned char *description; /* the whole RowDescription message a Describe returns */
    size_t description_len;
    int bare;                   /* Bind, Execute, Sync without Describe is approved too */
    uint64_t max_rows;          /* rows a reply may hold; 0: no limit */
    unsigned char *command;     /* a command approval: its whole CommandComplete message */
    size_t command_len;         /* 0: a statement that returns rows */
    /* A query template: its text is segments[0] hole[0] segments[1] hole[1] ... up to the
     * segment whose hole is HOLE_END. */
    size_t nsegments;
    unsigned char **segments;
    size_t *segment_len;
    int *holes;
    uint64_t runs, rows;        /* since the last collect */
} Approval;

typedef struct {
    Approval *approvals;
    size_t napprovals;
    double *bounds;    /* the duration histogram's upper bounds (seconds), +Inf implied */
    size_t nbounds;
    uint64_t *buckets; /* nbounds + 1, since the last collect */
    double sum;
    long inflight;     /* the approval whose request is in flight, -1: none */
    int described;
    uint32_t execute_rows; /* the row count of its Execute; 0: all */
    double started;
    unsigned char *request; /* the in-flight request, as forwarded */
    size_t request_len, request_cap;
    int status;           /* the transaction status of the last ReadyForQuery: 'I' or 'T' */
    int cleared;          /* since the last collect: a transaction ended (portals with it) */
    long bound;           /* since the last collect: the approval that last bound the unnamed
                           * portal and left it open (-1: none) */
    int bound_described;  /* ... with a Describe of the portal */
    int64_t queries_left; /* statements the budget still holds; -1: no limit */
    int64_t rows_left;    /* rows it still holds; -1: no limit */
    double deadline;      /* CLOCK_MONOTONIC seconds the budget lasts until; 0: for ever */
} Gate;

typedef struct Session {
    int state;
    uint32_t gen;
    size_t index; /* its slot in Relay.table */
    Side side[2];
    double last_activity; /* CLOCK_MONOTONIC seconds of the last client chunk, 0: none */
    int back, back_side;
    char *chunk;          /* BACK_CHUNK: the chunk, unforwarded */
    size_t chunk_len;
    Gate *gate;           /* a restricted session's approvals; NULL: unrestricted */
    struct Session *next_back;
} Session;

typedef struct {
    PyObject_HEAD
    int epfd, evfd;
    int started, stopping;
    pthread_t thread;
    pthread_mutex_t lock;
    Session **table;
    size_t ntable, cap;
    size_t *free_slots; /* indexes of FREE slots in the table, a stack (room for cap) */
    size_t nfree;
    Session *back_head, *back_tail;
    unsigned char *buf;       /* the thread's read buffer */
    unsigned char *seen;      /* the types of one chunk's headers, counted if it is forwarded */
    PyObject *error_class;
} Relay;

static double
now_monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t
make_key(size_t index, uint32_t gen, int side)
{
    return ((uint64_t)index << 33) | ((uint64_t)gen << 1) | (uint64_t)side;
}

/* A session's id for Python: its slot and the slot's generation, so an id is never reused
 * (a slot's generation moves on each time it is freed). */
static uint64_t
session_id(const Session *s)
{
    return ((uint64_t)s->gen << 32) | (uint64_t)s->index;
}

/* ------------------------------------------------------------------ scanning */

enum { PLAIN = 0, NEEDS_PYTHON = 1 };

static int
has_prefix(const Scan *s, const unsigned char *p, size_t avail)
{
    for (int i = 0; i < s->nprefixes; i++) {
        size_t len = s->prefix_len[i];
        if (len <= avail && memcmp(p, s->prefix[i], len) == 0)
            return 1;
    }
    return 0;
}

/*
 * One message header: type `t`, length field `len`, its body from d[body] (d holds n bytes).
 * Returns PLAIN with *next set to where the next header starts (> n: the body runs past the
 * chunk, and st->skip is set), or NEEDS_PYTHON. Mirrors MessageScanner.feed's loop body.
 */
static int
on_header(const Scan *cfg, ScanState *st, const unsigned char *d, size_t n, int t, uint64_t len, size_t body,
          unsigned char *seen, size_t *nseen, size_t *next)
{
    if (!cfg->allowed[t] || len < 4 ||
        len > (cfg->small[t] ? cfg->small_limit : cfg->big_limit))
        return NEEDS_PYTHON; /* the Python scanner raises the ProtocolViolation */
    size_t end = body + (size_t)(len - 4);
    if (cfg->watch[t]) {
        if (end > n)
            return NEEDS_PYTHON; /* a watched body split across chunks */
        if (t == cfg->status_type && len == 5)
            st->last_status = d[body];
        else if (t == cfg->tag_type) {
            if (has_prefix(cfg, d + body, end - body))
                return NEEDS_PYTHON; /* DDL: the schema catalog goes stale first */
        } else
            return NEEDS_PYTHON;
    }
    seen[(*nseen)++] = (unsigned char)t;
    st->last_type = t;
    if (end > n) {
        st->skip = end - n;
        st->partial_type = t;
    }
    *next = end;
    return PLAIN;
}

/*
 * Walks a chunk's headers. PLAIN: the state has advanced past it and its counts are added.
 * NEEDS_PYTHON: the state is as it was before the chunk.
 */
static int
scan_chunk(Scan *s, const unsigned char *d, size_t n, unsigned char *seen)
{
    ScanState st = s->st;
    size_t nseen = 0, pos = 0;
    if (st.skip) {
        if (st.skip >= n) {
            st.skip -= n;
            if (!st.skip)
                st.partial_type = -1;
            goto done;
        }
        pos = (size_t)st.skip;
        st.skip = 0;
        st.partial_type = -1;
    }
    if (st.head_len) {
        size_t need = 5 - (size_t)st.head_len;
        size_t have = n - pos < need ? n - pos : need;
        memcpy(st.head + st.head_len, d + pos, have);
        st.head_len += (int)have;
        pos += have;
        if (st.head_len < 5)
            goto done;
        st.head_len = 0;
        uint64_t len = ((uint64_t)st.head[1] << 24) | ((uint64_t)st.head[2] << 16) |
                       ((uint64_t)st.head[3] << 8) | (uint64_t)st.head[4];
        int t = st.head[0];
        /* The body starts at pos; a watched type needs its body in this chunk. */
        if (on_header(s, &st, d, n, t, len, pos, seen, &nseen, &pos) != PLAIN)
            return NEEDS_PYTHON;
        if (pos >= n)
            goto done;
    }
    while (pos < n) {
        if (n - pos < 5) {
            memcpy(st.head, d + pos, n - pos);
            st.head_len = (int)(n - pos);
            break;
        }
        int t = d[pos];
        uint64_t len = ((uint64_t)d[pos + 1] << 24) | ((uint64_t)d[pos + 2] << 16) |
                       ((uint64_t)d[pos + 3] << 8) | (uint64_t)d[pos + 4];
        size_t next;
        if (on_header(s, &st, d, n, t, len, pos + 5, seen, &nseen, &next) != PLAIN)
            return NEEDS_PYTHON;
        pos = next;
    }
done:
    for (size_t i = 0; i < nseen; i++)
        s->counts[seen[i]]++;
    s->bytes += n;
    s->st = st;
    return PLAIN;
}

/* ------------------------------------------------------------------ the gate */

static uint32_t
be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static int
be16(const unsigned char *p)
{
    return (int16_t)(((unsigned)p[0] << 8) | (unsigned)p[1]);
}

/* The message at d[pos] (n bytes in all): its type, and where it ends; 0 if it is not whole. */
static int
whole_message(const unsigned char *d, size_t n, size_t pos, size_t *end)
{
    if (n - pos < 5)
        return 0;
    uint32_t len = be32(d + pos + 1);
    if (len < 4 || (uint64_t)len > (uint64_t)(n - pos - 1))
        return 0;
    *end = pos + 1 + (size_t)len;
    return d[pos];
}

/*
 * A Bind body: unnamed portal, then the statement name; the parameters are skipped; what is
 * left (result formats) must be an approval's. Returns the approval's index, or -1.
 */
static long
approved_bind(const Gate *g, const unsigned char *b, size_t n)
{
    if (n < 1 || b[0] != 0)
        return -1; /* a named portal */
    size_t p = 1;
    const unsigned char *name = b + p;
    const unsigned char *nul = memchr(name, 0, n - p);
    if (!nul)
        return -1;
    size_t name_len = (size_t)(nul - name);
    p += name_len + 1;
    if (n - p < 2)
        return -1;
    int nformats = be16(b + p);
    p += 2;
    if (nformats < 0 || (size_t)nformats * 2 > n - p)
        return -1;
    p += (size_t)nformats * 2;
    if (n - p < 2)
        return -1;
    int nparams = be16(b + p);
    p += 2;
    if (nparams < 0)
        return -1;
    for (int i = 0; i < nparams; i++) {
        if (n - p < 4)
            return -1;
        int32_t len = (int32_t)be32(b + p);
        p += 4;
        if (len == -1)
            continue;
        if (len < 0 || (size_t)len > n - p)
            return -1;
        p += (size_t)len;
    }
    for (size_t i = 0; i < g->napprovals; i++) {
        const Approval *a = &g->approvals[i];
        if (!a->nsegments && a->name_len == name_len && a->formats_len == n - p &&
            memcmp(a->name, name, name_len) == 0 && memcmp(a->formats, b + p, n - p) == 0)
            return (long)i;
    }
    return -1;
}

/* The length of a hole's filler at q[0..n), or 0 if none is there. An integer: digits (at
 * most 32). A string: quote, then bytes other than quote and backslash (two quotes stand for
 * one), then quote. The template's bytes around a hole are never ones that would join it. */
static size_t
hole_filler(int hole, const unsigned char *q, size_t n)
{
    size_t i = 0;
    if (hole == HOLE_INTEGER) {
        while (i < n && i < 32 && q[i] >= '0' && q[i] <= '9')
            i++;
        return i < n && q[i] >= '0' && q[i] <= '9' ? 0 : i;
    }
    if (n < 2 || q[0] != '\'')
        return 0;
    for (i = 1; i < n; i++) {
        if (q[i] == '\\' || q[i] == 0)
            return 0;
        if (q[i] == '\'') {
            if (i + 1 < n && q[i + 1] == '\'') {
                i++;
                continue;
            }
            return i + 1;
        }
    }
    return 0;
}

/* Whether the query text q[0..n) is the template with each hole filled. */
static int
matches_template(const Approval *a, const unsigned char *q, size_t n)
{
    size_t pos = 0;
    for (size_t i = 0; i < a->nsegments; i++) {
        size_t len = a->segment_len[i];
        if (n - pos < len || memcmp(q + pos, a->segments[i], len) != 0)
            return 0;
        pos += len;
        if (a->holes[i] == HOLE_END)
            return pos == n;
        size_t filled = hole_filler(a->holes[i], q + pos, n - pos);
        if (!filled)
            return 0;
        pos += filled;
    }
    return 0;
}

/* A Query message whose text matches an approved template. */
static long
approved_query(const Gate *g, const unsigned char *body, size_t n)
{
    if (n < 1 || body[n - 1] != 0 || memchr(body, 0, n - 1))
        return -1;
    for (size_t i = 0; i < g->napprovals; i++) {
        const Approval *a = &g->approvals[i];
        if (a->nsegments && matches_template(a, body, n - 1))
            return (long)i;
    }
    return -1;
}

/* Whether the budget lets another statement go: one statement and one row are left (a
 * statement that reads rows is refused when none is left), and the deadline has not passed. */
static int
gate_budget_open(const Gate *g)
{
    if (g->queries_left == 0 || g->rows_left == 0)
        return 0;
    return g->deadline == 0 || now_monotonic() < g->deadline;
}

/* A client chunk the gate forwards, with nothing in flight: Bind, [Describe], Execute, Sync
 * of an approved statement, or one Query that fits an approved template. Sets *index and
 * *described; NEEDS_PYTHON for anything else. */
static int
gate_request(const Gate *g, const unsigned char *d, size_t n, long *index, int *described,
             uint32_t *execute_rows)
{
    size_t pos = 0, end;
    if (g->inflight >= 0)
        return NEEDS_PYTHON;
    int first = whole_message(d, n, pos, &end);
    if (first == 'Q' && end == n) {
        long found = approved_query(g, d + 5, n - 5);
        if (found < 0 || (!g->approvals[found].command_len && !gate_budget_open(g)))
            return NEEDS_PYTHON; /* (a command draws on no rate) */
        *index = found;
        *described = 1; /* a query's reply describes its rows */
        *execute_rows = 0;
        return PLAIN;
    }
    if (first != 'B' || !gate_budget_open(g))
        return NEEDS_PYTHON;
    long found = approved_bind(g, d + pos + 5, end - pos - 5);
    if (found < 0)
        return NEEDS_PYTHON;
    pos = end;
    int t = whole_message(d, n, pos, &end);
    int desc = 0;
    if (t == 'D') {
        if (end - pos != 7 || d[pos + 5] != 'P' || d[pos + 6] != 0)
            return NEEDS_PYTHON; /* a named portal, or a statement */
        desc = 1;
        pos = end;
        t = whole_message(d, n, pos, &end);
    }
    if (t != 'E' || end - pos != 10 || d[pos + 5] != 0 || (d[pos + 6] & 0x80))
        return NEEDS_PYTHON; /* a named portal, or a negative row count */
    uint32_t rows = be32(d + pos + 6);
    pos = end;
    if (whole_message(d, n, pos, &end) != 'S' || end - pos != 5 || end != n)
        return NEEDS_PYTHON;
    const Approval *a = &g->approvals[found];
    if (desc ? a->description_len == 0 : !a->bare)
        return NEEDS_PYTHON;
    *index = found;
    *described = desc;
    *execute_rows = rows;
    return PLAIN;
}

/* Whether d[pos..n) is exactly one ReadyForQuery with one of the two statuses. */
static int
ready_at_end(const unsigned char *d, size_t n, size_t pos, int status, int other)
{
    size_t end;
    return whole_message(d, n, pos, &end) == 'Z' && end - pos == 6 && end == n &&
           (d[pos + 5] == status || d[pos + 5] == other);
}

/* A server chunk the gate forwards: the whole reply to the request in flight. Sets *rows
 * and *status (of its ReadyForQuery). */
static int
gate_reply(const Gate *g, const unsigned char *d, size_t n, uint64_t *rows, int *status)
{
    if (g->inflight < 0)
        return NEEDS_PYTHON; /* a notice or a parameter status between requests */
    const Approval *a = &g->approvals[g->inflight];
    size_t pos = 0, end;
    if (a->command_len) {
        if (n < a->command_len || memcmp(d, a->command, a->command_len) != 0 ||
            !ready_at_end(d, n, a->command_len, 'I', 'T'))
            return NEEDS_PYTHON; /* a warning, an error, another tag */
        *rows = 0;
        *status = d[n - 1];
        return PLAIN;
    }
    if (!a->nsegments) {
        if (whole_message(d, n, pos, &end) != '2' || end != 5)
            return NEEDS_PYTHON; /* BindComplete first */
        pos = end;
    }
    if (g->described) {
        if (n - pos < a->description_len ||
            memcmp(d + pos, a->description, a->description_len) != 0)
            return NEEDS_PYTHON; /* not the description the policy saw pass */
        pos += a->description_len;
    }
    uint64_t count = 0;
    int t;
    while ((t = whole_message(d, n, pos, &end)) == 'D') {
        count++;
        pos = end;
    }
    if (t == 's') {
        /* PortalSuspended: the Execute's row count was reached, and only then. */
        if (end - pos != 5 || !g->execute_rows || count != g->execute_rows)
            return NEEDS_PYTHON;
    } else if (t != 'C' || end - pos < 5 + 7 || memcmp(d + pos + 5, "SELECT ", 7) != 0 ||
               (g->execute_rows && count > g->execute_rows))
        return NEEDS_PYTHON; /* an error, a notice, a split chunk, another command */
    pos = end;
    if (!ready_at_end(d, n, pos, g->status, g->status))
        return NEEDS_PYTHON; /* split, or the transaction status moved */
    if (a->max_rows && count > a->max_rows)
        return NEEDS_PYTHON; /* the row limit's refusal is the policy's to make */
    if (g->rows_left >= 0 && count > (uint64_t)g->rows_left)
        return NEEDS_PYTHON; /* more rows than the budget holds: the rate limit's to judge */
    if (g->deadline != 0 && now_monotonic() >= g->deadline)
        return NEEDS_PYTHON; /* the window the budget was charged to is over */
    *rows = count;
    *status = g->status;
    return PLAIN;
}

static int
gate_keep_request(Gate *g, const unsigned char *d, size_t n)
{
    if (n > g->request_cap) {
        unsigned char *grown = realloc(g->request, n);
        if (!grown)
            return -1;
        g->request = grown;
        g->request_cap = n;
    }
    memcpy(g->request, d, n);
    g->request_len = n;
    return 0;
}

static void
gate_observe(Gate *g, double seconds)
{
    size_t i = 0;
    while (i < g->nbounds && seconds > g->bounds[i])
        i++;
    g->buckets[i]++;
    g->sum += seconds;
}

static void
free_gate(Gate *g)
{
    if (!g)
        return;
    for (size_t i = 0; i < g->napprovals; i++) {
        Approval *a = &g->approvals[i];
        free(a->name);
        free(a->formats);
        free(a->description);
        free(a->command);
        for (size_t j = 0; j < a->nsegments; j++)
            free(a->segments[j]);
        free(a->segments);
        free(a->segment_len);
        free(a->holes);
    }
    free(g->approvals);
    free(g->bounds);
    free(g->buckets);
    free(g->request);
    free(g);
}

/* ------------------------------------------------------------------ the relay thread */

static void
set_interest(Relay *r, Session *s, size_t index, int which)
{
    Side *me = &s->side[which];
    Side *other = &s->side[which ^ 1];
    uint32_t want = 0;
    if (other->out_len == other->out_off)
        want |= EPOLLIN; /* read only while what was read before has gone out */
    if (me->out_len != me->out_off)
        want |= EPOLLOUT;
    if (want == me->events)
        return;
    struct epoll_event ev = {.events = want, .data.u64 = make_key(index, s->gen, which)};
    epoll_ctl(r->epfd, EPOLL_CTL_MOD, me->fd, &ev);
    me->events = want;
}

static void
unregister(Relay *r, Session *s)
{
    for (int i = 0; i < 2; i++) {
        if (s->side[i].events != (uint32_t)-1) {
            epoll_ctl(r->epfd, EPOLL_CTL_DEL, s->side[i].fd, NULL);
            s->side[i].events = (uint32_t)-1;
        }
    }
}

static void
hand_back(Relay *r, Session *s, int why, int side)
{
    unregister(r, s);
    s->state = RETURNED;
    s->back = why;
    s->back_side = side;
    s->next_back = NULL;
    if (r->back_tail)
        r->back_tail->next_back = s;
    else
        r->back_head = s;
    r->back_tail = s;
    uint64_t one = 1;
    ssize_t w = write(r->evfd, &one, sizeof one);
    (void)w; /* the counter cannot overflow: the event loop reads it */
}

static int
keep(Side *to, const unsigned char *d, size_t n)
{
    if (to->out_off == to->out_len)
        to->out_off = to->out_len = 0;
    if (to->out_len + n > to->out_cap) {
        size_t cap = to->out_cap ? to->out_cap : CHUNK;
        while (cap < to->out_len + n)
            cap *= 2;
        char *grown = realloc(to->out, cap);
        if (!grown)
            return -1;
        to->out = grown;
        to->out_cap = cap;
    }
    memcpy(to->out + to->out_len, d, n);
    to->out_len += n;
    return 0;
}

/* Writes what waits for `to`. 0: done or would block; -1: the socket failed. */
static int
flush_out(Side *to)
{
    while (to->out_off < to->out_len) {
        ssize_t w = send(to->fd, to->out + to->out_off, to->out_len - to->out_off,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            return -1;
        }
        to->out_off += (size_t)w;
    }
    to->out_off = to->out_len = 0;
    return 0;
}

static void
on_readable(Relay *r, Session *s, int from)
{
    Side *src = &s->side[from];
    Side *dst = &s->side[from ^ 1];
    if (dst->out_off != dst->out_len)
        return; /* still writing the last chunk: read when it has gone */
    ssize_t got;
    do {
        got = recv(src->fd, r->buf, CHUNK, MSG_DONTWAIT);
    } while (got < 0 && errno == EINTR);
    if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return;
    if (got <= 0) {
        hand_back(r, s, BACK_CLOSED, from); /* the event loop reads the end (or error) itself */
        return;
    }
    size_t n = (size_t)got;
    Gate *g = s->gate;
    long index = -1;
    int described = 0;
    uint32_t execute_rows = 0;
    uint64_t rows = 0;
    int status = 0;
    int gated = PLAIN;
    if (g)
        gated = from == CLIENT ? gate_request(g, r->buf, n, &index, &described, &execute_rows)
                               : gate_reply(g, r->buf, n, &rows, &status);
    if (gated != PLAIN || scan_chunk(&src->scan, r->buf, n, r->seen) != PLAIN) {
        s->chunk = malloc(n);
        if (s->chunk) {
            memcpy(s->chunk, r->buf, n);
            s->chunk_len = n;
            hand_back(r, s, BACK_CHUNK, from);
        } else {
            hand_back(r, s, BACK_CLOSED, from); /* out of memory: end the session */
        }
        return;
    }
    if (from == CLIENT)
        s->last_activity = now_monotonic();
    if (g && from == CLIENT) {
        if (gate_keep_request(g, r->buf, n) < 0) {
            hand_back(r, s, BACK_CLOSED, from); /* out of memory: end the session */
            return;
        }
        g->inflight = index;
        if (g->queries_left > 0 && !g->approvals[index].command_len)
            g->queries_left--;
        g->described = described;
        g->execute_rows = execute_rows;
        g->started = s->last_activity;
    } else if (g) {
        Approval *a = &g->approvals[g->inflight];
        a->runs++;
        a->rows += rows;
        if (g->rows_left > 0)
            g->rows_left -= (int64_t)rows;
        if (!a->nsegments) {
            g->bound = g->inflight; /* the unnamed portal is this approval's now */
            g->bound_described = g->described;
        }
        g->status = status;
        if (status == 'I') {
            g->cleared = 1; /* portals end with their transaction */
            g->bound = -1;
        }
        gate_observe(g, now_monotonic() - g->started);
        g->inflight = -1;
        g->request_len = 0;
    }
    size_t done = 0;
    while (done < n) {
        ssize_t w = send(dst->fd, r->buf + done, n - done, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            keep(dst, r->buf + done, n - done);
            hand_back(r, s, BACK_WRITE_ERROR, from ^ 1);
            return;
        }
        done += (size_t)w;
    }
    if (done < n && keep(dst, r->buf + done, n - done) < 0) {
        hand_back(r, s, BACK_CLOSED, from);
        return;
    }
}

static Session *
lookup(Relay *r, uint64_t key, size_t *index)
{
    size_t i = (size_t)(key >> 33);
    uint32_t gen = (uint32_t)(key >> 1);
    if (i >= r->ntable)
        return NULL;
    Session *s = r->table[i];
    if (!s || s->state != ACTIVE || s->gen != gen)
        return NULL;
    *index = i;
    return s;
}

static void *
relay_main(void *arg)
{
    Relay *r = (Relay *)arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals are the event loop's */
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(r->epfd, evs, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        pthread_mutex_lock(&r->lock);
        if (r->stopping) {
            pthread_mutex_unlock(&r->lock);
            break;
        }
        for (int i = 0; i < n; i++) {
            size_t index;
            Session *s = lookup(r, evs[i].data.u64, &index);
            if (!s)
                continue; /* taken back or handed back since epoll_wait returned */
            int which = (int)(evs[i].data.u64 & 1);
            uint32_t e = evs[i].events;
            if (e & (EPOLLERR | EPOLLHUP)) {
                /* Reported whatever the interest: the event loop reads the error or the end
                 * itself (waiting here for the other side to drain would spin). */
                hand_back(r, s, BACK_CLOSED, which);
                continue;
            }
            if ((e & EPOLLOUT) && flush_out(&s->side[which]) < 0) {
                hand_back(r, s, BACK_WRITE_ERROR, which);
                continue;
            }
            if ((e & EPOLLIN) && (s->side[which].events & EPOLLIN))
                on_readable(r, s, which);
            if (s->state == ACTIVE) {
                set_interest(r, s, index, CLIENT);
                set_interest(r, s, index, SERVER);
            }
        }
        pthread_mutex_unlock(&r->lock);
    }
    return NULL;
}

/* ------------------------------------------------------------------ Python side */

static int
bytes_table(PyObject *o, unsigned char *table, const char *what)
{
    Py_buffer view;
    if (PyObject_GetBuffer(o, &view, PyBUF_SIMPLE) < 0)
        return -1;
    if (view.len != 256) {
        PyBuffer_Release(&view);
        PyErr_Format(PyExc_ValueError, "%s: a table of 256 bytes is needed", what);
        return -1;
    }
    memcpy(table, view.buf, 256);
    PyBuffer_Release(&view);
    return 0;
}

/* config: (allowed, small, watch, small_limit, max_message, status_type, tag_type, prefixes)
 * state:  (skip, head, partial_type, last_type, last_status, tag_seen) */
static int
load_scan(Scan *s, PyObject *config, PyObject *state)
{
    PyObject *allowed, *small, *watch, *prefixes, *head;
    unsigned long long small_limit, max_message, skip;
    int status_type, tag_type, partial, last, last_status, tag_seen;
    if (!PyArg_ParseTuple(config, "OOOKKiiO!;relay config", &allowed, &small, &watch,
                          &small_limit, &max_message, &status_type, &tag_type, &PyTuple_Type,
                          &prefixes))
        return -1;
    if (!PyArg_ParseTuple(state, "KSiiii;relay scanner state", &skip, &head, &partial, &last,
                          &last_status, &tag_seen))
        return -1;
    if (bytes_table(allowed, s->allowed, "allowed") < 0 ||
        bytes_table(small, s->small, "small") < 0 || bytes_table(watch, s->watch, "watch") < 0)
        return -1;
    s->small_limit = small_limit + 4;
    s->big_limit = max_message + 4;
    s->status_type = status_type;
    s->tag_type = tag_type;
    Py_ssize_t np = PyTuple_GET_SIZE(prefixes);
    if (np > MAX_PREFIXES) {
        PyErr_SetString(PyExc_ValueError, "too many tag prefixes");
        return -1;
    }
    s->nprefixes = (int)np;
    for (Py_ssize_t i = 0; i < np; i++) {
        PyObject *p = PyTuple_GET_ITEM(prefixes, i);
        if (!PyBytes_Check(p) || PyBytes_GET_SIZE(p) > MAX_PREFIX_LEN) {
            PyErr_SetString(PyExc_ValueError, "a tag prefix is bytes of at most 64");
            return -1;
        }
        s->prefix_len[i] = (size_t)PyBytes_GET_SIZE(p);
        memcpy(s->prefix[i], PyBytes_AS_STRING(p), s->prefix_len[i]);
    }
    Py_ssize_t hl = PyBytes_GET_SIZE(head);
    if (hl > 4) {
        PyErr_SetString(PyExc_ValueError, "a split header is at most 4 bytes");
        return -1;
    }
    memcpy(s->st.head, PyBytes_AS_STRING(head), (size_t)hl);
    s->st.head_len = (int)hl;
    s->st.skip = skip;
    s->st.partial_type = partial;
    s->st.last_type = last;
    s->st.last_status = last_status;
    s->st.tag_seen = tag_seen;
    memset(s->counts, 0, sizeof s->counts);
    s->bytes = 0;
    return 0;
}

/* (skip, head, partial_type, last_type, last_status, tag_seen, counts, bytes); counts and
 * bytes are what was added since the last collect, which starts them again from zero. */
static PyObject *
collect_scan(Scan *s)
{
    PyObject *counts = PyList_New(0);
    if (!counts)
        return NULL;
    for (int t = 0; t < 256; t++) {
        if (!s->counts[t])
            continue;
        PyObject *pair = Py_BuildValue("(iK)", t, (unsigned long long)s->counts[t]);
        if (!pair || PyList_Append(counts, pair) < 0) {
            Py_XDECREF(pair);
            Py_DECREF(counts);
            return NULL;
        }
        Py_DECREF(pair);
    }
    const ScanState *st = &s->st;
    PyObject *out = Py_BuildValue("(Ky#iiiiNK)", (unsigned long long)st->skip, st->head,
                                  (Py_ssize_t)st->head_len, st->partial_type, st->last_type,
                                  st->last_status, st->tag_seen, counts,
                                  (unsigned long long)s->bytes);
    if (!out)
        return NULL;
    memset(s->counts, 0, sizeof s->counts);
    s->bytes = 0;
    return out;
}

static PyObject *
pending(Side *side)
{
    return PyBytes_FromStringAndSize(side->out + side->out_off,
                                     (Py_ssize_t)(side->out_len - side->out_off));
}

/* (runs, rows, buckets, sum, request): what the gate counted since the last collect (each
 * list in the order of the approvals, or of the histogram's buckets), which starts them again
 * from zero, and the request in flight (b"" if none). */
static PyObject *
collect_gate(Gate *g)
{
    PyObject *runs = PyList_New((Py_ssize_t)g->napprovals);
    PyObject *rows = PyList_New((Py_ssize_t)g->napprovals);
    PyObject *buckets = PyList_New((Py_ssize_t)g->nbounds + 1);
    if (!runs || !rows || !buckets)
        goto fail;
    for (size_t i = 0; i < g->napprovals; i++) {
        PyObject *a = PyLong_FromUnsignedLongLong((unsigned long long)g->approvals[i].runs);
        PyObject *b = PyLong_FromUnsignedLongLong((unsigned long long)g->approvals[i].rows);
        if (!a || !b) {
            Py_XDECREF(a);
            Py_XDECREF(b);
            goto fail;
        }
        PyList_SET_ITEM(runs, (Py_ssize_t)i, a);
        PyList_SET_ITEM(rows, (Py_ssize_t)i, b);
    }
    for (size_t i = 0; i <= g->nbounds; i++) {
        PyObject *c = PyLong_FromUnsignedLongLong((unsigned long long)g->buckets[i]);
        if (!c)
            goto fail;
        PyList_SET_ITEM(buckets, (Py_ssize_t)i, c);
    }
    size_t inflight = g->inflight >= 0 ? g->request_len : 0;
    PyObject *out = Py_BuildValue("(NNNdy#lCili)", runs, rows, buckets, g->sum,
                                  g->request ? (const char *)g->request : "",
                                  (Py_ssize_t)inflight, g->inflight, g->status, g->cleared,
                                  g->bound, g->bound_described);
    if (!out)
        return NULL; /* Py_BuildValue's N took the lists even so */
    g->cleared = 0;
    g->bound = -1;
    for (size_t i = 0; i < g->napprovals; i++)
        g->approvals[i].runs = g->approvals[i].rows = 0;
    memset(g->buckets, 0, (g->nbounds + 1) * sizeof *g->buckets);
    g->sum = 0;
    return out;
fail:
    Py_XDECREF(runs);
    Py_XDECREF(rows);
    Py_XDECREF(buckets);
    return NULL;
}

/* (id, back, back_side, client, server, last_activity, to_client, to_server, chunk, gate);
 * gate is None for an unrestricted session. */
static PyObject *
collect(Session *s, int whole)
{
    PyObject *gate = Py_None;
    Py_INCREF(gate);
    if (s->gate) {
        Py_DECREF(gate);
        gate = collect_gate(s->gate);
        if (!gate)
            return NULL;
    }
    PyObject *client = collect_scan(&s->side[CLIENT].scan);
    PyObject *server = client ? collect_scan(&s->side[SERVER].scan) : NULL;
    if (!server) {
        Py_XDECREF(client);
        Py_DECREF(gate);
        return NULL;
    }
    unsigned long long id = (unsigned long long)session_id(s);
    if (!whole)
        return Py_BuildValue("(KiiNNdyyyN)", id, s->back, s->back_side, client,
                             server, s->last_activity, "", "", "", gate);
    PyObject *to_client = pending(&s->side[CLIENT]);
    PyObject *to_server = pending(&s->side[SERVER]);
    PyObject *chunk = PyBytes_FromStringAndSize(s->chunk ? s->chunk : "",
                                                (Py_ssize_t)s->chunk_len);
    if (!to_client || !to_server || !chunk) {
        Py_DECREF(client);
        Py_DECREF(server);
        Py_DECREF(gate);
        Py_XDECREF(to_client);
        Py_XDECREF(to_server);
        Py_XDECREF(chunk);
        return NULL;
    }
    return Py_BuildValue("(KiiNNdNNNN)", id, s->back, s->back_side, client,
                         server, s->last_activity, to_client, to_server, chunk, gate);
}

static void
free_session(Relay *r, size_t index)
{
    Session *s = r->table[index];
    free(s->side[CLIENT].out);
    free(s->side[SERVER].out);
    free(s->chunk);
    free_gate(s->gate);
    s->gate = NULL;
    s->side[CLIENT].out = s->side[SERVER].out = NULL;
    s->chunk = NULL;
    s->chunk_len = 0;
    s->side[CLIENT].out_len = s->side[CLIENT].out_off = s->side[CLIENT].out_cap = 0;
    s->side[SERVER].out_len = s->side[SERVER].out_off = s->side[SERVER].out_cap = 0;
    s->state = FREE;
    s->gen++; /* stale epoll events for this slot no longer match */
    r->free_slots[r->nfree++] = index; /* (it has room for every slot of the table) */
}

static void
unlink_back(Relay *r, Session *s)
{
    Session *prev = NULL;
    for (Session *p = r->back_head; p; prev = p, p = p->next_back) {
        if (p != s)
            continue;
        if (prev)
            prev->next_back = p->next_back;
        else
            r->back_head = p->next_back;
        if (r->back_tail == p)
            r->back_tail = prev;
        p->next_back = NULL;
        return;
    }
}

static int
start_thread(Relay *r)
{
    if (r->started)
        return 0;
    int err = pthread_create(&r->thread, NULL, relay_main, r);
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    r->started = 1;
    Py_INCREF(r); /* the thread uses it for the life of the process */
    return 0;
}

static unsigned char *
copy_bytes(PyObject *o, size_t *len, const char *what)
{
    if (!PyBytes_Check(o)) {
        PyErr_Format(PyExc_TypeError, "gate: %s must be bytes", what);
        return NULL;
    }
    *len = (size_t)PyBytes_GET_SIZE(o);
    unsigned char *out = malloc(*len ? *len : 1);
    if (!out) {
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(out, PyBytes_AS_STRING(o), *len);
    return out;
}

/* A query template: ((segment, hole), ...), the last hole HOLE_END. */
static int
load_template(Approval *a, PyObject *template)
{
    if (!PyTuple_Check(template) || PyTuple_GET_SIZE(template) < 1) {
        PyErr_SetString(PyExc_ValueError, "gate: a template is a non-empty tuple");
        return -1;
    }
    size_t n = (size_t)PyTuple_GET_SIZE(template);
    a->segments = calloc(n, sizeof *a->segments);
    a->segment_len = calloc(n, sizeof *a->segment_len);
    a->holes = calloc(n, sizeof *a->holes);
    if (!a->segments || !a->segment_len || !a->holes) {
        PyErr_NoMemory();
        return -1;
    }
    a->nsegments = n;
    for (size_t i = 0; i < n; i++) {
        PyObject *segment;
        int hole;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(template, (Py_ssize_t)i), "O!i;gate template",
                              &PyBytes_Type, &segment, &hole))
            return -1;
        if (hole < HOLE_END || hole > HOLE_STRING || (hole == HOLE_END) != (i == n - 1)) {
            PyErr_SetString(PyExc_ValueError, "gate: a template's last hole, and only it, ends it");
            return -1;
        }
        a->holes[i] = hole;
        if (!(a->segments[i] = copy_bytes(segment, &a->segment_len[i], "a segment")))
            return -1;
    }
    return 0;
}

/* gate: (approvals, bounds, budget, status); approvals: ((name, formats, description, bare,
 * max_rows, template, command), ...) with template None for a prepared statement and command
 * b"" but for a command approval; bounds: the duration histogram's finite upper bounds,
 * ascending; budget: (statements, rows, seconds), -1 for no limit, seconds <= 0 for no
 * deadline; status: the transaction status, 'I' or 'T'. */
static Gate *
load_gate(PyObject *spec)
{
    PyObject *approvals, *bounds;
    long long queries = -1, rows = -1;
    double seconds = 0.0;
    int status;
    if (!PyArg_ParseTuple(spec, "O!O!(LLd)C;relay gate", &PyTuple_Type, &approvals,
                          &PyTuple_Type, &bounds, &queries, &rows, &seconds, &status))
        return NULL;
    if (queries < -1 || rows < -1) {
        PyErr_SetString(PyExc_ValueError, "gate: a budget is a count, or -1 for no limit");
        return NULL;
    }
    if (status != 'I' && status != 'T') {
        PyErr_SetString(PyExc_ValueError, "gate: the transaction status is 'I' or 'T'");
        return NULL;
    }
    Gate *g = calloc(1, sizeof *g);
    if (!g) {
        PyErr_NoMemory();
        return NULL;
    }
    g->inflight = -1;
    g->status = status;
    g->bound = -1;
    g->queries_left = queries;
    g->rows_left = rows;
    g->deadline = seconds > 0 ? now_monotonic() + seconds : 0;
    g->napprovals = (size_t)PyTuple_GET_SIZE(approvals);
    g->nbounds = (size_t)PyTuple_GET_SIZE(bounds);
    g->approvals = calloc(g->napprovals ? g->napprovals : 1, sizeof *g->approvals);
    g->bounds = calloc(g->nbounds ? g->nbounds : 1, sizeof *g->bounds);
    g->buckets = calloc(g->nbounds + 1, sizeof *g->buckets);
    if (!g->approvals || !g->bounds || !g->buckets) {
        free_gate(g);
        PyErr_NoMemory();
        return NULL;
    }
    for (size_t i = 0; i < g->nbounds; i++) {
        g->bounds[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(bounds, (Py_ssize_t)i));
        if (g->bounds[i] == -1.0 && PyErr_Occurred()) {
            free_gate(g);
            return NULL;
        }
    }
    for (size_t i = 0; i < g->napprovals; i++) {
        PyObject *name, *formats, *description, *template, *command;
        int bare;
        unsigned long long max_rows;
        Approval *a = &g->approvals[i];
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(approvals, (Py_ssize_t)i),
                              "O!O!O!pKOO!;relay approval", &PyBytes_Type, &name, &PyBytes_Type,
                              &formats, &PyBytes_Type, &description, &bare, &max_rows, &template,
                              &PyBytes_Type, &command) ||
            (template != Py_None && load_template(a, template) < 0) ||
            (PyBytes_GET_SIZE(command) && template == Py_None &&
             (PyErr_SetString(PyExc_ValueError, "gate: a command approval is a query's"), 1)) ||
            !(a->command = copy_bytes(command, &a->command_len, "a command tag")) ||
            !(a->name = copy_bytes(name, &a->name_len, "a statement name")) ||
            !(a->formats = copy_bytes(formats, &a->formats_len, "result formats")) ||
            !(a->description = copy_bytes(description, &a->description_len, "a description"))) {
            free_gate(g);
            return NULL;
        }
        a->bare = bare;
        a->max_rows = max_rows;
    }
    return g;
}

static PyObject *
Relay_add(Relay *r, PyObject *args)
{
    int cfd, sfd;
    PyObject *ccfg, *scfg, *cstate, *sstate, *spec = Py_None;
    if (!PyArg_ParseTuple(args, "iiOOOO|O", &cfd, &sfd, &ccfg, &scfg, &cstate, &sstate, &spec))
        return NULL;
    Session fresh;
    memset(&fresh, 0, sizeof fresh);
    if (load_scan(&fresh.side[CLIENT].scan, ccfg, cstate) < 0 ||
        load_scan(&fresh.side[SERVER].scan, scfg, sstate) < 0)
        return NULL;
    if (spec != Py_None && !(fresh.gate = load_gate(spec)))
        return NULL;
    if (start_thread(r) < 0) {
        free_gate(fresh.gate);
        return NULL;
    }
    pthread_mutex_lock(&r->lock);
    size_t index = r->ntable;
    if (r->nfree)
        index = r->free_slots[--r->nfree];
    if (index == r->ntable) {
        if (r->ntable == r->cap) {
            size_t cap = r->cap ? r->cap * 2 : 64;
            Session **grown = realloc(r->table, cap * sizeof *grown);
            if (grown)
                r->table = grown;
            size_t *slots = grown ? realloc(r->free_slots, cap * sizeof *slots) : NULL;
            if (!slots) {
                pthread_mutex_unlock(&r->lock);
                free_gate(fresh.gate);
                return PyErr_NoMemory();
            }
            r->free_slots = slots;
            r->cap = cap;
        }
        Session *slot = calloc(1, sizeof *slot);
        if (!slot) {
            pthread_mutex_unlock(&r->lock);
            free_gate(fresh.gate);
            return PyErr_NoMemory();
        }
        r->table[r->ntable++] = slot;
    }
    Session *s = r->table[index];
    uint32_t gen = s->gen;
    *s = fresh;
    s->gen = gen;
    s->index = index;
    s->state = ACTIVE;
    s->back = BACK_RECALLED;
    s->back_side = -1;
    s->side[CLIENT].fd = cfd;
    s->side[SERVER].fd = sfd;
    for (int i = 0; i < 2; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = make_key(index, s->gen, i)};
        if (epoll_ctl(r->epfd, EPOLL_CTL_ADD, s->side[i].fd, &ev) < 0) {
            int err = errno;
            if (i == 1) {
                epoll_ctl(r->epfd, EPOLL_CTL_DEL, s->side[0].fd, NULL);
            }
            s->side[0].events = s->side[1].events = (uint32_t)-1;
            free_session(r, index);
            pthread_mutex_unlock(&r->lock);
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        s->side[i].events = EPOLLIN;
    }
    uint64_t id = session_id(s);
    pthread_mutex_unlock(&r->lock);
    return PyLong_FromUnsignedLongLong((unsigned long long)id);
}

static Session *
find(Relay *r, PyObject *arg, size_t *index)
{
    unsigned long long id = PyLong_AsUnsignedLongLong(arg);
    if (id == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    size_t i = (size_t)(id & 0xffffffffu);
    uint32_t gen = (uint32_t)(id >> 32);
    if (i >= r->ntable || r->table[i]->state == FREE || r->table[i]->gen != gen) {
        PyErr_Format(PyExc_KeyError, "no relayed session %llu", id);
        return NULL;
    }
    *index = i;
    return r->table[i];
}

static PyObject *
Relay_recall(Relay *r, PyObject *arg)
{
    pthread_mutex_lock(&r->lock);
    size_t index;
    Session *s = find(r, arg, &index);
    PyObject *out = NULL;
    if (s) {
        if (s->state == ACTIVE)
            unregister(r, s);
        else
            unlink_back(r, s);
        out = collect(s, 1);
        if (out)
            free_session(r, index);
    }
    pthread_mutex_unlock(&r->lock);
    return out;
}

static PyObject *
Relay_peek(Relay *r, PyObject *arg)
{
    pthread_mutex_lock(&r->lock);
    size_t index;
    Session *s = find(r, arg, &index);
    PyObject *out = s ? collect(s, 0) : NULL;
    pthread_mutex_unlock(&r->lock);
    return out;
}

static PyObject *
Relay_take(Relay *r, PyObject *unused)
{
    uint64_t count;
    ssize_t got = read(r->evfd, &count, sizeof count); /* nonblocking: EAGAIN when none */
    (void)got;
    PyObject *list = PyList_New(0);
    if (!list)
        return NULL;
    pthread_mutex_lock(&r->lock);
    while (r->back_head) {
        Session *s = r->back_head;
        size_t index = s->index;
        PyObject *item = collect(s, 1);
        if (!item || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(list);
            pthread_mutex_unlock(&r->lock);
            return NULL;
        }
        Py_DECREF(item);
        r->back_head = s->next_back;
        if (!r->back_head)
            r->back_tail = NULL;
        s->next_back = NULL;
        free_session(r, index);
    }
    pthread_mutex_unlock(&r->lock);
    return list;
}

static PyObject *
Relay_fileno(Relay *r, PyObject *unused)
{
    return PyLong_FromLong(r->evfd);
}

static PyObject *
Relay_active(Relay *r, PyObject *unused)
{
    size_t count = 0;
    pthread_mutex_lock(&r->lock);
    for (size_t i = 0; i < r->ntable; i++)
        count += r->table[i]->state != FREE;
    pthread_mutex_unlock(&r->lock);
    return PyLong_FromSize_t(count);
}

static PyObject *
Relay_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) || (kwds && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "Relay() takes no arguments");
        return NULL;
    }
    Relay *r = (Relay *)type->tp_alloc(type, 0);
    if (!r)
        return NULL;
    r->epfd = r->evfd = -1;
    r->buf = malloc(CHUNK);
    r->seen = malloc(CHUNK / 5 + 2);
    if (!r->buf || !r->seen) {
        Py_DECREF(r);
        return PyErr_NoMemory();
    }
    pthread_mutex_init(&r->lock, NULL);
    r->epfd = epoll_create1(EPOLL_CLOEXEC);
    r->evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (r->epfd < 0 || r->evfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(r);
        return NULL;
    }
    return (PyObject *)r;
}

static void
Relay_dealloc(Relay *r)
{
    /* A Relay whose thread started holds a reference to itself, so only one that never
     * started a thread gets here. */
    {
        for (size_t i = 0; i < r->ntable; i++) {
            if (r->table[i]->state != FREE)
                free_session(r, i);
            free(r->table[i]);
        }
        free(r->table);
        free(r->free_slots);
        free(r->buf);
        free(r->seen);
        if (r->epfd >= 0)
            close(r->epfd);
        if (r->evfd >= 0)
            close(r->evfd);
        pthread_mutex_destroy(&r->lock);
    }
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyMethodDef Relay_methods[] = {
    {"add", (PyCFunction)Relay_add, METH_VARARGS,
     "add(client_fd, server_fd, client_config, server_config, client_state, server_state"
     "[, gate]) -> id: relay a session until it needs Python"},
    {"recall", (PyCFunction)Relay_recall, METH_O, "recall(id) -> state: take a session back"},
    {"peek", (PyCFunction)Relay_peek, METH_O,
     "peek(id) -> state: a session's counters and scanner state, leaving it relayed"},
    {"take", (PyCFunction)Relay_take, METH_NOARGS,
     "take() -> [state]: the sessions the thread handed back"},
    {"fileno", (PyCFunction)Relay_fileno, METH_NOARGS,
     "the eventfd that is readable when sessions were handed back"},
    {"active", (PyCFunction)Relay_active, METH_NOARGS, "sessions relayed or waiting to be taken"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "proxy._relay.Relay",
    .tp_basicsize = sizeof(Relay),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The relay thread of unrestricted plaintext sessions (one per process).",
    .tp_new = Relay_new,
    .tp_dealloc = (destructor)Relay_dealloc,
    .tp_methods = Relay_methods,
};

static struct PyModuleDef relay_module = {
    PyModuleDef_HEAD_INIT, "proxy._relay",
    "The byte relay of unrestricted plaintext sessions, in a C thread (see proxy/relay.py).",
    -1, NULL,
};

PyMODINIT_FUNC
PyInit__relay(void)
{
    if (PyType_Ready(&RelayType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&relay_module);
    if (!module)
        return NULL;
    Py_INCREF(&RelayType);
    if (PyModule_AddObject(module, "Relay", (PyObject *)&RelayType) < 0 ||
        PyModule_AddIntConstant(module, "BACK_RECALLED", BACK_RECALLED) < 0 ||
        PyModule_AddIntConstant(module, "BACK_CHUNK", BACK_CHUNK) < 0 ||
        PyModule_AddIntConstant(module, "BACK_CLOSED", BACK_CLOSED) < 0 ||
        PyModule_AddIntConstant(module, "BACK_WRITE_ERROR", BACK_WRITE_ERROR) < 0 ||
        PyModule_AddIntConstant(module, "CHUNK", CHUNK) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
