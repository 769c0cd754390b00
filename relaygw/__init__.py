"""relaygw: a trusted SMTP relay gateway on Twisted."""

__version__ = "0.1.0"
