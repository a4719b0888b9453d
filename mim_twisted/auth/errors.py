"""The error every SASL step raises; the stream layer turns it into ``<failure/>``."""

# RFC 6120 §6.5: the defined children of <failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>.
SASL_CONDITIONS = frozenset(
    {
        "aborted",
        "account-disabled",
        "credentials-expired",
        "encryption-required",
        "incorrect-encoding",
        "invalid-authzid",
        "invalid-mechanism",
        "malformed-request",
        "mechanism-too-weak",
        "not-authorized",
        "temporary-auth-failure",
    }
)


class SaslError(Exception):
    """A failed SASL exchange: an RFC 6120 condition and an optional human-readable text."""

    def __init__(self, condition: str, text: str | None = None) -> None:
        # A misspelt condition would reach the client as invalid XML; catch it where it is raised.
        if condition not in SASL_CONDITIONS:
            raise ValueError(f"unknown SASL condition {condition!r}")
        super().__init__(condition, text)
        self.condition = condition
        self.text = text
