"""Reading a session's context back with XDUMPCONTEXT."""


def dump(c):
    """XDUMPCONTEXT as C{{(scope, key): value}}, checking the line format."""
    code, lines = c.cmd("XDUMPCONTEXT")
    assert code == 250, (code, lines)
    assert lines[-1] == "2.0.0 XDUMPCONTEXT complete", lines
    out = {}
    for line in lines[:-1]:
        assert line.startswith("2.0.0 ["), line
        scope, _, rest = line[7:].partition("] ")
        key, _, value = rest.partition(" ")
        out[(scope, key)] = value
    return out


def conn(c):
    """The connection scope of XDUMPCONTEXT as a dict."""
    return {k: v for (scope, k), v in dump(c).items() if scope == "connection"}
