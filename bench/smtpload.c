/*
 * A C load generator for the bench cells smtp-source can't express:
 * XCLIENT per session (as nginx sends it), a PROXY v2 header (as HAProxy's
 * send-proxy-v2 does) and STARTTLS, with the latency from the end of DATA to
 * the 250.  Like smtp-source: one message per connection, no PIPELINING, one
 * event loop for every session (no thread per session to compete with the
 * server for the cores), so that it measures the server, not itself.
 *
 * Every session slot starts its next connection when one ends, until the
 * message count or the deadline, whichever comes first; with rate=R, no
 * sooner than its turn in a schedule of R sessions a second (latency at a
 * given load rather than at saturation).  Loopback only.
 *
 *   smtpload PORT SESSIONS COUNT SIZE SECONDS [tls] [resume] [xclient] [proxy] [rate=R]
 *
 * Prints one JSON object: messages, errors, seconds, rate, p50_ms, p99_ms,
 * resumed (TLS sessions resumed).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int port, count, size, useTLS, resume, xclient, proxy;
static int next, done, errors, resumed, epfd, active;
static double deadline;
static double rate, nextStart;   /* rate=R: sessions start at most R a second (0: when a slot is free) */
static struct conn **idle;       /* slots waiting for their start time */
static int nidle;
static char *payload;
static size_t payloadLen;
static SSL_CTX *ctx;
static double *lat;
static char firstError[200];

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* One session's steps, in order.  Each sends its text (if any), then reads one reply. */
enum { S_CONNECT, S_PROXY, S_GREETING, S_EHLO, S_STARTTLS, S_HANDSHAKE, S_EHLO_TLS, S_XCLIENT, S_EHLO_XCLIENT,
       S_MAIL, S_RCPT, S_DATA, S_CONTENT, S_QUIT, S_END };
static const char *stepName[] = {"connect", "proxy header", "greeting", "EHLO", "STARTTLS", "handshake",
                                 "EHLO after STARTTLS", "XCLIENT", "EHLO after XCLIENT", "MAIL", "RCPT", "DATA",
                                 "end of data", "QUIT", "end"};
static const int expect[] = {0, 0, 220, 250, 220, 0, 250, 220, 250, 250, 250, 354, 250, 221, 0};

struct conn {
    int fd, n, step, events;
    SSL *ssl;
    SSL_SESSION *saved;       /* this slot's last TLS session, offered again with "resume" */
    const char *out;          /* what is left to send for this step */
    size_t outLen;
    int sending;              /* 1 while the step's text is being sent, 0 while its reply is read */
    char line[256];
    char buf[8192];
    int len, off;
    double started;
};

static void fail(struct conn *c) {
    errors++;
    if (!firstError[0]) snprintf(firstError, sizeof firstError, "%s", stepName[c->step]);
}

static void want(struct conn *c, int events) {
    if (events == c->events) return;
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(epfd, c->events ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, c->fd, &ev);
    c->events = events;
}

static int skip(int step) {
    return (step == S_PROXY && !proxy) ||
           ((step == S_STARTTLS || step == S_HANDSHAKE || step == S_EHLO_TLS) && !useTLS) ||
           ((step == S_XCLIENT || step == S_EHLO_XCLIENT) && !xclient);
}

/* Set up the step's text to send. */
static void enter(struct conn *c, int step) {
    while (skip(step)) step++;
    c->step = step;
    c->sending = 1;
    switch (step) {
    case S_PROXY: {
        unsigned char *h = (unsigned char *)c->line;
        memcpy(h, "\r\n\r\n\0\r\nQUIT\n", 12);
        h[12] = 0x21; h[13] = 0x11; h[14] = 0; h[15] = 12;
        h[16] = 192; h[17] = 0; h[18] = 2; h[19] = c->n % 250 + 1;   /* source 192.0.2.x */
        h[20] = 127; h[21] = 0; h[22] = 0; h[23] = 1;
        int sport = 1024 + c->n % 60000;
        h[24] = sport >> 8; h[25] = sport & 255; h[26] = 0; h[27] = 25;
        c->out = c->line; c->outLen = 28;
        break;
    }
    case S_EHLO: case S_EHLO_TLS: c->out = "EHLO loadgen.example\r\n"; break;
    case S_STARTTLS: c->out = "STARTTLS\r\n"; break;
    case S_XCLIENT:
        snprintf(c->line, sizeof c->line, "XCLIENT ADDR=192.0.2.%d NAME=[UNAVAILABLE]\r\n", c->n % 250 + 1);
        c->out = c->line;
        break;
    case S_EHLO_XCLIENT: c->out = "EHLO client.example\r\n"; break;
    case S_MAIL: c->out = "MAIL FROM:<a@example.org>\r\n"; break;
    case S_RCPT: c->out = "RCPT TO:<b@example.net>\r\n"; break;
    case S_DATA: c->out = "DATA\r\n"; break;
    /* The content and its end in one write, as smtp-source sends them. */
    case S_CONTENT: c->out = payload; c->outLen = payloadLen; c->started = now(); break;
    case S_QUIT: c->out = "QUIT\r\n"; break;
    default: c->out = NULL; c->sending = 0; break;
    }
    if (c->out && step != S_PROXY && step != S_CONTENT) c->outLen = strlen(c->out);
}

/* OpenSSL or the socket would block: 1 (wait for the events set), or -1 on an error. */
static int blocked(struct conn *c, int r) {
    if (c->ssl) {
        int e = SSL_get_error(c->ssl, r);
        ERR_clear_error();  /* (one queue for every connection: nothing left for the next one to see) */
        if (e == SSL_ERROR_WANT_READ) { want(c, EPOLLIN); return 1; }
        if (e == SSL_ERROR_WANT_WRITE) { want(c, EPOLLOUT); return 1; }
        return -1;
    }
    if (r < 0 && (errno == EAGAIN || errno == EINTR)) { want(c, c->sending ? EPOLLOUT : EPOLLIN); return 1; }
    return -1;
}

/* Read until one whole reply is in: its code, 0 to wait, -1 on an error. */
static int reply(struct conn *c) {
    for (;;) {
        char *nl = memchr(c->buf + c->off, '\n', c->len - c->off);
        if (nl) {
            char *line = c->buf + c->off;
            int more = (nl - line) >= 4 && line[3] == '-';
            int code = atoi(line);
            c->off = nl - c->buf + 1;
            if (!more) return code;
            continue;
        }
        if (c->off) {
            memmove(c->buf, c->buf + c->off, c->len - c->off);
            c->len -= c->off;
            c->off = 0;
        }
        if (c->len == sizeof c->buf) return -1;
        int r = c->ssl ? SSL_read(c->ssl, c->buf + c->len, sizeof c->buf - c->len)
                       : (int)recv(c->fd, c->buf + c->len, sizeof c->buf - c->len, 0);
        if (r <= 0) return blocked(c, r) > 0 ? 0 : -1;
        c->len += r;
    }
}

static void finish(struct conn *c);

/* Drive the session as far as it goes without waiting. */
static void advance(struct conn *c) {
    for (;;) {
        if (c->step == S_CONNECT) {
            int err = 0;
            socklen_t l = sizeof err;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
            if (err) { fail(c); finish(c); return; }
            enter(c, S_PROXY);
            continue;
        }
        if (c->step == S_HANDSHAKE) {
            int r = SSL_connect(c->ssl);
            if (r != 1) {
                if (blocked(c, r) > 0) return;
                fail(c); finish(c); return;
            }
            if (SSL_session_reused(c->ssl)) resumed++;
            c->len = c->off = 0;
            enter(c, S_EHLO_TLS);
            continue;
        }
        if (c->sending) {
            while (c->outLen) {
                int w = c->ssl ? SSL_write(c->ssl, c->out, (int)c->outLen)
                               : (int)send(c->fd, c->out, c->outLen, MSG_NOSIGNAL);
                if (w <= 0) {
                    if (blocked(c, w) > 0) return;
                    fail(c); finish(c); return;
                }
                c->out += w;
                c->outLen -= w;
            }
            c->sending = 0;
            if (c->step == S_PROXY) { enter(c, c->step + 1); continue; }
        }
        int code = reply(c);
        if (code == 0) return;
        if (code != expect[c->step]) { fail(c); finish(c); return; }
        if (c->step == S_CONTENT) lat[done++] = now() - c->started;
        if (c->step == S_STARTTLS) {
            c->ssl = SSL_new(ctx);
            SSL_set_fd(c->ssl, c->fd);
            SSL_set_tlsext_host_name(c->ssl, "relay.bench");
            if (resume && c->saved) SSL_set_session(c->ssl, c->saved);
            enter(c, S_HANDSHAKE);
            continue;
        }
        if (c->step == S_EHLO_TLS && resume) {  /* TLS 1.3 tickets arrive after the handshake: keep the latest */
            SSL_SESSION *s = SSL_get1_session(c->ssl);
            if (s) {
                if (c->saved) SSL_SESSION_free(c->saved);
                c->saved = s;
            }
        }
        if (c->step == S_QUIT) { finish(c); return; }
        enter(c, c->step + 1);
    }
}

/* Start this slot's next session, if the count and the deadline allow one. */
static void start(struct conn *c) {
    if (next >= count || now() > deadline) return;
    if (rate) {
        double t = now();
        if (t < nextStart) { idle[nidle++] = c; return; }
        /* On schedule, without making up for more than 10 ms of lost time in a burst. */
        nextStart = (nextStart > t - 0.01 ? nextStart : t - 0.01) + 1 / rate;
    }
    c->n = next++;
    c->len = c->off = 0;
    c->events = 0;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    c->step = S_CONNECT;
    c->sending = 0;
    active++;
    if (connect(c->fd, (struct sockaddr *)&sa, sizeof sa) && errno != EINPROGRESS) {
        fail(c); finish(c); return;
    }
    want(c, EPOLLOUT);
}

static void finish(struct conn *c) {
    if (c->ssl) {
        if (c->step == S_QUIT) SSL_shutdown(c->ssl);
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    close(c->fd);  /* (and out of the epoll set) */
    active--;
    start(c);
}

static int cmpd(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: smtpload PORT SESSIONS COUNT SIZE SECONDS [tls] [resume] [xclient] [proxy] [rate=R]\n");
        return 2;
    }
    port = atoi(argv[1]);
    int sessions = atoi(argv[2]);
    count = atoi(argv[3]);
    size = atoi(argv[4]);
    double seconds = atof(argv[5]);
    for (int i = 6; i < argc; i++) {
        useTLS |= !strcmp(argv[i], "tls");
        resume |= !strcmp(argv[i], "resume");
        xclient |= !strcmp(argv[i], "xclient");
        proxy |= !strcmp(argv[i], "proxy");
        if (!strncmp(argv[i], "rate=", 5)) rate = atof(argv[i] + 5);
    }
    /* The body: headers, then 76-character lines, like bench/loadgen.py. */
    const char *head = "From: <a@example.org>\r\nTo: <b@example.net>\r\nSubject: bench\r\n\r\n";
    size_t hl = strlen(head), lines = size > (int)hl ? (size - hl) / 78 : 1;
    if (!lines) lines = 1;
    payloadLen = hl + lines * 78 + 3;
    payload = malloc(payloadLen);
    memcpy(payload, head, hl);
    for (size_t i = 0; i < lines; i++) {
        memset(payload + hl + i * 78, 'x', 76);
        memcpy(payload + hl + i * 78 + 76, "\r\n", 2);
    }
    memcpy(payload + hl + lines * 78, ".\r\n", 3);
    if (useTLS) {
        ctx = SSL_CTX_new(TLS_client_method());
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    }
    lat = calloc(count, sizeof *lat);
    struct conn *slots = calloc(sessions, sizeof *slots);
    idle = calloc(sessions, sizeof *idle);
    epfd = epoll_create1(0);
    double started = now();
    deadline = started + seconds;
    for (int i = 0; i < sessions; i++) start(&slots[i]);
    struct epoll_event evs[256];
    while (active || nidle) {
        int wait = 1000;
        if (nidle) {
            double ms = (nextStart - now()) * 1000;
            wait = ms > 0 ? (int)ms + 1 : 0;
        }
        int n = epoll_wait(epfd, evs, 256, wait);
        for (int i = 0; i < n; i++) advance(evs[i].data.ptr);
        if (next >= count || now() > deadline) nidle = 0;
        while (nidle && now() >= nextStart) start(idle[--nidle]);
    }
    double elapsed = now() - started;
    qsort(lat, done, sizeof *lat, cmpd);
    double p50 = done ? lat[(int)(0.50 * done) < done ? (int)(0.50 * done) : done - 1] * 1000 : 0;
    double p99 = done ? lat[(int)(0.99 * done) < done ? (int)(0.99 * done) : done - 1] * 1000 : 0;
    printf("{\"messages\": %d, \"errors\": %d, \"firstError\": [\"%s\"], \"seconds\": %.4f, \"rate\": %.2f, "
           "\"p50_ms\": %.3f, \"p99_ms\": %.3f, \"resumed\": %d}\n",
           done, errors, firstError, elapsed, done / elapsed, p50, p99, resumed);
    return 0;
}
