/*
 * A C load generator for the bench cells smtp-source can't express:
 * XCLIENT per session (as nginx sends it), a PROXY v2 header (as HAProxy's
 * send-proxy-v2 does) and STARTTLS, with the latency from the end of DATA to
 * the 250.  Like smtp-source: one message per connection, no PIPELINING, and
 * cheap enough per message that it measures the server, not itself.
 *
 * One thread per session with blocking sockets; every session ends at the
 * message count or the deadline, whichever comes first.  Loopback only.
 *
 *   smtpload PORT SESSIONS COUNT SIZE SECONDS [tls] [resume] [xclient] [proxy]
 *
 * Prints one JSON object: messages, errors, seconds, rate, p50_ms, p99_ms,
 * resumed (TLS sessions resumed).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int port, sessions, count, size, useTLS, resume, xclient, proxy;
static double deadline;
static atomic_int next, done, errors, resumed;
static char *payload;
static size_t payloadLen;
static SSL_CTX *ctx;
static double *lat;
static char firstError[200];
static pthread_mutex_t errLock = PTHREAD_MUTEX_INITIALIZER;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

struct conn {
    int fd;
    SSL *ssl;
    char buf[8192];
    int len, off;
};

static int sendAll(struct conn *c, const char *p, size_t n) {
    while (n) {
        int w = c->ssl ? SSL_write(c->ssl, p, (int)n) : (int)send(c->fd, p, n, MSG_NOSIGNAL);
        if (w <= 0) {
            if (!c->ssl && w < 0 && errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= w;
    }
    return 0;
}

/* Read one reply (all its lines); returns its code or -1. */
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
        if (r <= 0) {
            if (!c->ssl && r < 0 && errno == EINTR) continue;
            return -1;
        }
        c->len += r;
    }
}

static int cmd(struct conn *c, const char *line, int expect) {
    if (sendAll(c, line, strlen(line))) return -1;
    return reply(c) == expect ? 0 : -1;
}

static void fail(const char *what) {
    atomic_fetch_add(&errors, 1);
    pthread_mutex_lock(&errLock);
    if (!firstError[0]) snprintf(firstError, sizeof firstError, "%s", what);
    pthread_mutex_unlock(&errLock);
}

static int session(int n, SSL_SESSION **saved) {
    struct conn c = {.fd = -1};
    char line[256];
    int ok = -1;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    c.fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c.fd, (struct sockaddr *)&sa, sizeof sa)) { fail("connect"); goto out; }
    if (proxy) {
        unsigned char h[28] = "\r\n\r\n\0\r\nQUIT\n";
        h[12] = 0x21; h[13] = 0x11; h[14] = 0; h[15] = 12;
        h[16] = 192; h[17] = 0; h[18] = 2; h[19] = n % 250 + 1;   /* source 192.0.2.x */
        h[20] = 127; h[21] = 0; h[22] = 0; h[23] = 1;
        int sport = 1024 + n % 60000;
        h[24] = sport >> 8; h[25] = sport & 255; h[26] = 0; h[27] = 25;
        if (sendAll(&c, (char *)h, sizeof h)) { fail("proxy header"); goto out; }
    }
    if (reply(&c) != 220) { fail("greeting"); goto out; }
    if (cmd(&c, "EHLO loadgen.example\r\n", 250)) { fail("EHLO"); goto out; }
    if (useTLS) {
        if (cmd(&c, "STARTTLS\r\n", 220)) { fail("STARTTLS"); goto out; }
        c.ssl = SSL_new(ctx);
        SSL_set_fd(c.ssl, c.fd);
        SSL_set_tlsext_host_name(c.ssl, "relay.bench");
        if (resume && *saved) SSL_set_session(c.ssl, *saved);
        if (SSL_connect(c.ssl) != 1) { fail("handshake"); goto out; }
        if (SSL_session_reused(c.ssl)) atomic_fetch_add(&resumed, 1);
        c.len = c.off = 0;
        if (cmd(&c, "EHLO loadgen.example\r\n", 250)) { fail("EHLO after STARTTLS"); goto out; }
        if (resume) {  /* TLS 1.3 tickets arrive after the handshake: keep the latest */
            SSL_SESSION *s = SSL_get1_session(c.ssl);
            if (s) {
                if (*saved) SSL_SESSION_free(*saved);
                *saved = s;
            }
        }
    }
    if (xclient) {
        snprintf(line, sizeof line, "XCLIENT ADDR=192.0.2.%d NAME=[UNAVAILABLE]\r\n", n % 250 + 1);
        if (cmd(&c, line, 220)) { fail("XCLIENT"); goto out; }
        if (cmd(&c, "EHLO client.example\r\n", 250)) { fail("EHLO after XCLIENT"); goto out; }
    }
    if (cmd(&c, "MAIL FROM:<a@example.org>\r\n", 250)) { fail("MAIL"); goto out; }
    if (cmd(&c, "RCPT TO:<b@example.net>\r\n", 250)) { fail("RCPT"); goto out; }
    if (cmd(&c, "DATA\r\n", 354)) { fail("DATA"); goto out; }
    /* The content and its end in one write, as smtp-source sends them. */
    double started = now();
    if (sendAll(&c, payload, payloadLen) || reply(&c) != 250) { fail("end of data"); goto out; }
    double took = now() - started;
    if (cmd(&c, "QUIT\r\n", 221)) { fail("QUIT"); goto out; }
    lat[atomic_fetch_add(&done, 1)] = took;
    ok = 0;
out:
    if (c.ssl) {
        SSL_shutdown(c.ssl);
        SSL_free(c.ssl);
    }
    close(c.fd);
    return ok;
}

static void *worker(void *arg) {
    SSL_SESSION *saved = NULL;
    (void)arg;
    for (;;) {
        int n = atomic_fetch_add(&next, 1);
        if (n >= count || now() > deadline) break;
        session(n, &saved);
    }
    if (saved) SSL_SESSION_free(saved);
    return NULL;
}

static int cmpd(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: smtpload PORT SESSIONS COUNT SIZE SECONDS [tls] [resume] [xclient] [proxy]\n");
        return 2;
    }
    port = atoi(argv[1]);
    sessions = atoi(argv[2]);
    count = atoi(argv[3]);
    size = atoi(argv[4]);
    double seconds = atof(argv[5]);
    for (int i = 6; i < argc; i++) {
        useTLS |= !strcmp(argv[i], "tls");
        resume |= !strcmp(argv[i], "resume");
        xclient |= !strcmp(argv[i], "xclient");
        proxy |= !strcmp(argv[i], "proxy");
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
    pthread_t *t = calloc(sessions, sizeof *t);
    double started = now();
    deadline = started + seconds;
    for (int i = 0; i < sessions; i++) {
        pthread_attr_t a;
        pthread_attr_init(&a);
        pthread_attr_setstacksize(&a, 256 * 1024);
        pthread_create(&t[i], &a, worker, NULL);
        pthread_attr_destroy(&a);
    }
    for (int i = 0; i < sessions; i++) pthread_join(t[i], NULL);
    double elapsed = now() - started;
    int n = atomic_load(&done);
    qsort(lat, n, sizeof *lat, cmpd);
    double p50 = n ? lat[(int)(0.50 * n) < n ? (int)(0.50 * n) : n - 1] * 1000 : 0;
    double p99 = n ? lat[(int)(0.99 * n) < n ? (int)(0.99 * n) : n - 1] * 1000 : 0;
    printf("{\"messages\": %d, \"errors\": %d, \"firstError\": [\"%s\"], \"seconds\": %.4f, \"rate\": %.2f, "
           "\"p50_ms\": %.3f, \"p99_ms\": %.3f, \"resumed\": %d}\n",
           n, atomic_load(&errors), firstError, elapsed, n / elapsed, p50, p99, atomic_load(&resumed));
    return 0;
}
