"""EXTERNAL (RFC 4422 Appendix A) with the client certificate of the TLS layer (XEP-0178).

The client's only message is its authorisation identity: empty (or "=") for none. Who the
certificate proves the client to be is decided by `mim_twisted.auth.certs`; this module adds the
SASL exchange, the account check (``auth.cert_accounts``) and the log line of every decision.
"""

from typing import NoReturn

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from mim_twisted.auth import certs
from mim_twisted.auth.errors import SaslError
from mim_twisted.xmpp.sasl.mechanism import Challenge, ISaslMechanism, SaslContext, Success

log = Logger()

# What the client reads in <text/>: short, the log has the details.
_CLIENT_TEXT = {
    "not-authorized": "The certificate does not prove this identity",
    "invalid-authzid": "Choose one of the certificate's identities as authzid",
    "malformed-request": "The authzid is not UTF-8",
}


@implementer(ISaslMechanism)
class ExternalMechanism:
    name = "EXTERNAL"
    # A certificate cannot be guessed: its failures count against no budget.
    username = None

    def __init__(self, context: SaslContext) -> None:
        self._context = context
        self._done = False

    def start(self, initial_response: bytes | None) -> Deferred:
        if initial_response is None:
            # No initial response: an empty challenge asks for the authzid (RFC 6120 §6.4.2).
            return succeed(Challenge(b""))
        return self.respond(initial_response)

    def respond(self, response: bytes) -> Deferred:
        if self._done:
            return fail(SaslError("malformed-request", "EXTERNAL takes one message"))
        self._done = True
        return Deferred.fromCoroutine(self._authenticate(response))

    async def _authenticate(self, message: bytes) -> Success:
        context = self._context
        try:
            authzid = message.decode("utf-8") or None
        except UnicodeDecodeError:
            self._refused("malformed-request", "the authzid is not UTF-8", None)
        if context.client_identities is None:
            # Not offered without one; the negotiation refuses it before we get here.
            self._refused("not-authorized", "no verified client certificate", authzid)
        claim = certs.ExternalClaim(
            context.client_identities, authzid, context.domain, context.domains, context.external
        )
        try:
            decision = certs.verify_external_identity(claim)
        except certs.CertificateRefused as refusal:
            self._refused(refusal.condition, refusal.reason, authzid)
        identity = decision.identity
        if context.external.require_account and not await context.accounts.account_exists(
            identity.domain, identity.localpart
        ):
            self._refused("not-authorized", f"{identity} has no account", authzid)
        log.info(
            "{peer}: SASL EXTERNAL accepted {jid} ({method}, authzid {authzid!r})",
            peer=context.peer,
            jid=str(identity),
            method=decision.method,
            authzid=authzid,
        )
        # The authzid has been checked against the certificate here: nothing left to check.
        return Success(identity.localpart, None)

    def _refused(self, condition: str, reason: str, authzid: str | None) -> NoReturn:
        identities = self._context.client_identities
        log.info(
            "{peer}: SASL EXTERNAL refused, {condition}: {reason} (authzid {authzid!r},"
            " xmppAddrs {xmpp_addrs}, CN {common_name!r})",
            peer=self._context.peer,
            condition=condition,
            reason=reason,
            authzid=authzid,
            xmpp_addrs=list(identities.xmpp_addrs) if identities else [],
            common_name=identities.common_name if identities else None,
        )
        raise SaslError(condition, _CLIENT_TEXT.get(condition))
