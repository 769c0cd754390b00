from twisted.application.service import ServiceMaker

relaygw = ServiceMaker(
    "relaygw", "relaygw.tap", "A trusted SMTP relay gateway (XCLIENT, PROXY, durable spool).", "relaygw"
)
