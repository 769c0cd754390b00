"""
A small SMTP load generator (asyncio) for what smtp-source can't express:
STARTTLS, XCLIENT per session (as nginx does) and a PROXY v2 header, and
the latency from the end of DATA to the 250.  Like smtp-source, one message
per connection and no PIPELINING.

    python -m bench.loadgen --port 2525 --sessions 100 --count 2000 --size 4096 [--tls] [--xclient] [--proxy]
"""

import argparse
import asyncio
import concurrent.futures
import ipaddress
import json
import ssl
import struct
import time

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def proxyV2(src, sport, dst="127.0.0.1", dport=25):
    body = ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed + struct.pack("!HH", sport, dport)
    return SIG + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def body(size):
    line = b"x" * 76 + b"\r\n"
    head = b"From: <a@example.org>\r\nTo: <b@example.net>\r\nSubject: bench\r\n\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


async def reply(reader):
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return int(line[:3])


async def one(host, port, payload, opts, latencies, n):
    reader, writer = await asyncio.open_connection(host, port)
    try:
        if opts.proxy:
            writer.write(proxyV2("192.0.2.%d" % (n % 250 + 1), 1024 + n % 60000))
        await reply(reader)

        async def cmd(line, expect):
            writer.write(line)
            code = await reply(reader)
            if code != expect:
                raise RuntimeError("%r -> %d" % (line, code))

        await cmd(b"EHLO loadgen.example\r\n", 250)
        if opts.tls:
            await cmd(b"STARTTLS\r\n", 220)
            await writer.start_tls(_clientContext())
            await cmd(b"EHLO loadgen.example\r\n", 250)
        if opts.xclient:
            await cmd(b"XCLIENT ADDR=192.0.2.%d NAME=[UNAVAILABLE]\r\n" % (n % 250 + 1), 220)
            await cmd(b"EHLO client.example\r\n", 250)
        await cmd(b"MAIL FROM:<a@example.org>\r\n", 250)
        await cmd(b"RCPT TO:<b@example.net>\r\n", 250)
        await cmd(b"DATA\r\n", 354)
        writer.write(payload)
        started = time.perf_counter()
        writer.write(b".\r\n")
        code = await reply(reader)
        latencies.append(time.perf_counter() - started)
        if code != 250:
            raise RuntimeError("end of data -> %d" % code)
        writer.write(b"QUIT\r\n")
        await reply(reader)
    finally:
        writer.close()


_CONTEXT = []


def _clientContext():
    """One TLS client context for the run (building one loads the CA store)."""
    if not _CONTEXT:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        _CONTEXT.append(ctx)
    return _CONTEXT[0]


def oneBlocking(host, port, payload, opts, latencies, n):
    """
    The same session with blocking sockets, for STARTTLS: asyncio's
    start_tls added tens of milliseconds per session here, which would
    measure the load generator rather than the server.
    """
    import socket

    sock = socket.create_connection((host, port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # like smtp-source and asyncio
    try:
        if opts.proxy:
            sock.sendall(proxyV2("192.0.2.%d" % (n % 250 + 1), 1024 + n % 60000))
        reader = sock.makefile("rb")

        def reply():
            while True:
                line = reader.readline()
                if not line:
                    raise ConnectionError("closed")
                if line[3:4] != b"-":
                    return int(line[:3])

        def cmd(line, expect):
            sock.sendall(line)
            code = reply()
            if code != expect:
                raise RuntimeError("%r -> %d" % (line, code))

        reply()
        cmd(b"EHLO loadgen.example\r\n", 250)
        if opts.tls:
            cmd(b"STARTTLS\r\n", 220)
            sock = _clientContext().wrap_socket(sock, server_hostname="relay.bench")
            reader = sock.makefile("rb")
            cmd(b"EHLO loadgen.example\r\n", 250)
        if opts.xclient:
            cmd(b"XCLIENT ADDR=192.0.2.%d NAME=[UNAVAILABLE]\r\n" % (n % 250 + 1), 220)
            cmd(b"EHLO client.example\r\n", 250)
        cmd(b"MAIL FROM:<a@example.org>\r\n", 250)
        cmd(b"RCPT TO:<b@example.net>\r\n", 250)
        cmd(b"DATA\r\n", 354)
        sock.sendall(payload)
        started = time.perf_counter()
        sock.sendall(b".\r\n")
        code = reply()
        latencies.append(time.perf_counter() - started)
        if code != 250:
            raise RuntimeError("end of data -> %d" % code)
        cmd(b"QUIT\r\n", 221)
    finally:
        sock.close()


async def run(opts):
    payload = body(opts.size)
    latencies, errors = [], []
    counter = iter(range(opts.count))
    deadline = time.monotonic() + opts.seconds

    async def worker():
        for n in counter:
            if time.monotonic() > deadline:
                return
            try:
                if opts.tls:
                    await loop.run_in_executor(pool, oneBlocking, opts.host, opts.port, payload, opts,
                                               latencies, n)
                else:
                    await one(opts.host, opts.port, payload, opts, latencies, n)
            except Exception as e:  # counted, and the run goes on
                errors.append(str(e))

    loop = asyncio.get_running_loop()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=opts.sessions)
    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(opts.sessions)))
    pool.shutdown()
    elapsed = time.monotonic() - started
    latencies.sort()

    def pct(p):
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else None

    return {"messages": len(latencies), "errors": len(errors), "firstError": errors[:1], "seconds": elapsed,
            "rate": len(latencies) / elapsed if elapsed else 0, "p50_ms": pct(0.50), "p99_ms": pct(0.99)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sessions", type=int, default=10)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--tls", action="store_true")
    p.add_argument("--xclient", action="store_true")
    p.add_argument("--proxy", action="store_true")
    opts = p.parse_args(argv)
    if opts.host not in ("127.0.0.1", "::1", "localhost"):
        p.error("loopback only")
    print(json.dumps(asyncio.run(run(opts))))


if __name__ == "__main__":
    main()
