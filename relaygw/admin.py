"""
The admin endpoint (twisted.web, loopback by default): C{/healthz} for load
balancers and C{/metrics} for Prometheus.  Everything else is a 404.
"""

from prometheus_client import CONTENT_TYPE_LATEST
from twisted.web.resource import NoResource, Resource
from twisted.web.server import Site

from relaygw.logs import Logger

log = Logger(namespace="relaygw.admin")


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
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self.metrics.render()


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


class _QuietSite(Site):
    """A L{Site} without the per-request access log."""

    noisy = False

    def log(self, request):
        pass


def makeAdminSite(metrics, health):
    """A L{Site} serving L{AdminResource}."""
    return _QuietSite(AdminResource(metrics, health))
