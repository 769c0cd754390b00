"""Cutting a byte stream into pieces at arbitrary offsets, for readers that must not care where the reads end."""


def chunked(stream, cuts):
    """C{stream} cut at the offsets C{cuts} (any integers, taken modulo its length + 1), in order."""
    cuts = sorted({c % (len(stream) + 1) for c in cuts})
    out, last = [], 0
    for c in cuts + [len(stream)]:
        out.append(stream[last:c])
        last = c
    return out
