"""
The admin endpoint (twisted.web, loopback by default): C{/healthz} for load
balancers and C{/metrics} for Prometheus.
"""

from prometheus_client import CONTENT_TYPE_LATEST
from twisted.web.resource import NoResource, Resource
from twisted.web.server import Site


class _Health(Resource):
    isLeaf = True

    def __init__(self, health):
        Resource.__init__(self)
        self.health = health

    def render_GET(self, request):
        ok, reason = self.health()
        request.setResponseCode(200 if ok else 503)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return (reason + "\n").encode("utf-8")


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, metrics):
        Resource.__init__(self)
        self.metrics = metrics

    def render_GET(self, request):
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self.metrics.render()


class AdminResource(Resource):
    """C{/healthz} (200 while accepting, 503 draining or spool not writable) and C{/metrics}."""

    def __init__(self, metrics, health):
        Resource.__init__(self)
        self.putChild(b"healthz", _Health(health))
        self.putChild(b"metrics", _Metrics(metrics))

    def getChild(self, path, request):
        return NoResource()


def makeAdminSite(metrics, health):
    site = Site(AdminResource(metrics, health))
    site.noisy = False
    site.log = lambda request: None  # no access log per health check
    return site
