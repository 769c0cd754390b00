"""
The admin endpoint (twisted.web, loopback by default): C{/healthz} for load
balancers and C{/metrics} for Prometheus.  Everything else is a 404.

It shares a worker's reactor with SMTP sessions, so what one client can
cost it is bounded: one request per connection (C{Connection: close}; a
client that pipelines requests and never reads the responses cannot make
it render and buffer them without end), a whole connection's life capped
at L{LIFETIME} seconds (a client sending its request a byte at a time
keeps twisted.web's idle timeout from ever striking), and at most
L{MAX_CONNECTIONS} at once (each holds a file descriptor the SMTP
listeners need; when they are all taken, the oldest one still without a
whole request gives way to the new one, so idle clients cannot keep a
load balancer's health check out), and a request body (which no page
reads) kept in memory up to L{MAX_BODY} octets, where twisted.web spools
a large or chunked one to a temporary file without limit.
"""

import io
import re

from prometheus_client import CONTENT_TYPE_LATEST
from twisted.web.http import HTTPChannel
from twisted.web.resource import NoResource, Resource
from twisted.web.server import Request, Site

from relaygw.logs import Logger

log = Logger(namespace="relaygw.admin")

#: Seconds a connection may last, its request and the response included.
LIFETIME = 30

#: Connections served at once; more are closed as they come.
MAX_CONNECTIONS = 64

#: Octets of request body read; a connection sending more is cut off.
MAX_BODY = 64 * 1024


class _Health(Resource):
    """200 C{ok} while C{health()} says so, else 503 and its reason."""

    def __init__(self, health):
        Resource.__init__(self)
        self.health = health

    def render_GET(self, request):
        try:
            ok, reason = self.health()
        except Exception:
            log.failure("health check failed")
            ok, reason = False, "health check failed"
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if ok:
            return b"ok\n"
        request.setResponseCode(503)
        return (" ".join(str(reason).split()) + "\n").encode("utf-8")


class _Metrics(Resource):
    """The metrics in the Prometheus text format."""

    def __init__(self, metrics):
        Resource.__init__(self)
        self.metrics = metrics

    def render_GET(self, request):
        body = self.metrics.render()
        if not body:  # (the render failed, and logged why: a failed scrape, not every series gone at once)
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"metrics unavailable\n"
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return body


class AdminResource(Resource):
    """Root of the admin site: C{/healthz} and C{/metrics}; any other path is a 404."""

    def __init__(self, metrics, health):
        Resource.__init__(self)
        self.putChild(b"healthz", _Health(health))
        self.putChild(b"metrics", _Metrics(metrics))

    def getChild(self, path, request):
        return NoResource()

    def render(self, request):
        return NoResource().render(request)


class _OneRequestChannel(HTTPChannel):
    """An HTTP connection that serves one request, within L{LIFETIME} seconds."""

    def connectionMade(self):
        HTTPChannel.connectionMade(self)
        self._expiry = self.callLater(LIFETIME, self.transport.abortConnection)
        self.site.waiting[self] = None

    def allContentReceived(self):
        self.site.waiting.pop(self, None)
        HTTPChannel.allContentReceived(self)

    def connectionLost(self, reason):
        if self._expiry.active():
            self._expiry.cancel()
        self.site.waiting.pop(self, None)
        self.site.open -= 1
        HTTPChannel.connectionLost(self, reason)

    def checkPersistence(self, request, version):
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        return False


#: The scheme and authority of a request target in absolute form (RFC 9112, 3.2.2).
_ABSOLUTE = re.compile(rb"(?i)https?://[^/?#]*")


class _BoundedRequest(Request):
    """
    A request whose body stays in memory, up to L{MAX_BODY} octets; a
    target in absolute form (C{http://host/healthz}) names the page its
    path does, as a server must accept it.
    """

    def requestReceived(self, command, path, version):
        absolute = _ABSOLUTE.match(path)
        if absolute is not None:
            path = path[absolute.end():]
            path = path if path.startswith(b"/") else b"/" + path
        Request.requestReceived(self, command, path, version)

    def gotLength(self, length):
        self.content = io.BytesIO()
        self._bodyOctets = 0

    def handleContentChunk(self, data):
        self._bodyOctets += len(data)
        if self._bodyOctets > MAX_BODY:
            self.channel.transport.abortConnection()
        elif not self.channel.transport.disconnecting:
            self.content.write(data)


class _AdminSite(Site):
    """A L{Site} without the per-request access log, within the limits above."""

    noisy = False
    protocol = _OneRequestChannel
    requestFactory = _BoundedRequest
    #: Connections open now.
    open = 0

    def __init__(self, resource):
        Site.__init__(self, resource)
        #: The channels still waiting for a whole request, oldest first.
        self.waiting = {}

    def buildProtocol(self, addr):
        if self.open >= MAX_CONNECTIONS:
            if not self.waiting:
                return None  # (closed at once)
            oldest = next(iter(self.waiting))
            del self.waiting[oldest]
            oldest.transport.abortConnection()  # (counted out when it is lost)
        self.open += 1
        return Site.buildProtocol(self, addr)

    def log(self, request):
        pass


def makeAdminSite(metrics, health):
    """A L{Site} serving L{AdminResource}."""
    return _AdminSite(AdminResource(metrics, health))
