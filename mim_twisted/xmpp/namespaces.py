"""XML namespaces of the XMPP core protocols (RFC 6120, RFC 6121) and of XEP-0198 stream
management, used by the stream layer."""

STREAMS = "http://etherx.jabber.org/streams"
CLIENT = "jabber:client"
TLS = "urn:ietf:params:xml:ns:xmpp-tls"
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
BIND = "urn:ietf:params:xml:ns:xmpp-bind"
SESSION = "urn:ietf:params:xml:ns:xmpp-session"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
STREAM_ERRORS = "urn:ietf:params:xml:ns:xmpp-streams"
SM = "urn:xmpp:sm:3"  # XEP-0198
