"""The modes of an SMTP session (L{relaygw.protocol.SMTPSession.mode})."""

COMMAND, DATA, AUTH, CLOSED = "command", "data", "auth", "closed"
