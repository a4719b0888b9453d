"""XEP-0178 certificate identity rules (mim_twisted.auth.certs): reading certificates and the
decision table of every verification method, including where MongooseIM 3.3 was wrong."""

from cryptography import x509
from cryptography.x509.oid import NameOID
from twisted.trial import unittest

from mim_twisted.auth import certs
from mim_twisted.auth.certs import (
    CertificateIdentities,
    CertificateRefused,
    ExternalClaim,
    ExternalSettings,
    Identity,
)
from mim_twisted.extensions import ServerRegistry
from tests.certfactory import Authority, utf8_string

DOMAIN = "localhost"
SERVED = frozenset({"localhost", "example.net"})


class CertificateIdentitiesTests(unittest.TestCase):
    def setUp(self) -> None:
        self.ca = Authority()

    def identities(self, *args, **kwargs) -> CertificateIdentities:
        return certs.certificate_identities(self.ca.issue(*args, **kwargs).certificate)

    def test_no_subject_alt_name(self) -> None:
        identities = self.identities("john")
        self.assertEqual((identities.xmpp_addrs, identities.common_name), ((), "john"))

    def test_one_xmpp_addr(self) -> None:
        self.assertEqual(self.identities("bob", ["bob@localhost"]).xmpp_addrs, ("bob@localhost",))

    def test_several_xmpp_addrs_in_certificate_order(self) -> None:
        identities = self.identities("not-alice", ["alice@localhost", "alice@fed1", "Ü@localhost"])
        self.assertEqual(identities.xmpp_addrs, ("alice@localhost", "alice@fed1", "Ü@localhost"))
        self.assertEqual(identities.common_name, "not-alice")

    def test_long_xmpp_addr(self) -> None:
        # Over 127 bytes: the DER length takes the long form.
        jid = "a" * 200 + "@localhost"
        self.assertEqual(self.identities(None, [jid]).xmpp_addrs, (jid,))

    def test_entries_that_do_not_decode_are_skipped(self) -> None:
        raw = (
            b"\x16\x0dbob@localhost",  # an IA5String, not a UTF8String
            b"\x0c\x04\xff\xfe\xfd\xfc",  # a UTF8String that is not UTF-8
            b"\x04\x03abc",  # an OCTET STRING
            b"\x30\x03\x0c\x01a",  # a SEQUENCE holding a UTF8String
            b"\x0c\x00",  # empty
        )
        identities = self.identities("bob", ["bob@localhost"], raw_xmpp_addrs=raw)
        self.assertEqual(identities.xmpp_addrs, ("bob@localhost",))

    def test_other_san_types_are_not_identities(self) -> None:
        # The factory adds an e-mail SAN; DNS names and other otherName OIDs do not count either.
        issued = self.ca.issue("bob")
        san = x509.SubjectAlternativeName(
            [
                x509.DNSName("bob.localhost"),
                x509.OtherName(x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3"), utf8_string("b")),
            ]
        )
        certificate = (
            x509.CertificateBuilder()
            .subject_name(issued.certificate.subject)
            .issuer_name(self.ca.name)
            .public_key(issued.key.public_key())
            .serial_number(1)
            .not_valid_before(issued.certificate.not_valid_before_utc)
            .not_valid_after(issued.certificate.not_valid_after_utc)
            .add_extension(san, critical=False)
            .sign(self.ca.key, issued.certificate.signature_hash_algorithm)
        )
        self.assertEqual(certs.certificate_identities(certificate).xmpp_addrs, ())

    def test_common_name_must_be_single(self) -> None:
        self.assertIsNone(self.identities(None, ["bob@localhost"]).common_name)
        two = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, "bob"),
                x509.NameAttribute(NameOID.COMMON_NAME, "robert"),
            ]
        )
        self.assertIsNone(self.identities(subject=two).common_name)

    def test_decode_utf8_string(self) -> None:
        self.assertEqual(
            certs.decode_utf8_string(utf8_string("jüliet@localhost")), "jüliet@localhost"
        )
        self.assertEqual(certs.decode_utf8_string(utf8_string("x" * 300)), "x" * 300)
        # DER that a certificate library may let through or not: never an identity.
        for der in (
            b"\x0c\x05bob@localhost",  # the length is shorter than the content
            b"\x0c\x20bob",  # longer
            b"\x0c\x80bob",  # indefinite length
            b"\x0c\x85\x01\x00\x00\x00\x00",  # a length of more than 4 octets
            b"\x0c",
            b"",
        ):
            self.assertIsNone(certs.decode_utf8_string(der), der)


class BareIdentityTests(unittest.TestCase):
    def test_normalised(self) -> None:
        self.assertEqual(certs.bare_identity("Alice@LocalHost"), Identity("alice", "localhost"))

    def test_resource_is_not_identity(self) -> None:
        self.assertEqual(certs.bare_identity("alice@localhost/Phone"), ("alice", "localhost"))

    def test_final_dot_of_the_domain(self) -> None:
        self.assertEqual(certs.bare_identity("alice@localhost."), ("alice", "localhost"))

    def test_not_user_jids(self) -> None:
        too_long = "a" * 1024 + "@localhost"
        for text in (
            "localhost",
            "@localhost",
            "alice@",
            "al ice@localhost",
            "a@b@c",
            "",
            too_long,
        ):
            self.assertIsNone(certs.bare_identity(text), text)


def claim(
    xmpp_addrs=(),
    authzid=None,
    common_name=None,
    methods=("standard",),
    prefix="",
    suffix="",
    verifiers=certs.BUILTIN_VERIFICATION_METHODS,
) -> ExternalClaim:
    return ExternalClaim(
        CertificateIdentities(tuple(xmpp_addrs), common_name),
        authzid,
        DOMAIN,
        SERVED,
        ExternalSettings(tuple(methods), prefix, suffix, verifiers=verifiers),
    )


class DecisionTestMixin:
    methods: tuple[str, ...]
    verifiers = certs.BUILTIN_VERIFICATION_METHODS

    def accepts(self, expected: str, **kwargs) -> None:
        decision = certs.verify_external_identity(
            claim(methods=self.methods, verifiers=self.verifiers, **kwargs)
        )
        self.assertEqual(str(decision.identity), expected)

    def refuses(self, condition: str, **kwargs) -> CertificateRefused:
        refused = self.assertRaises(
            CertificateRefused,
            certs.verify_external_identity,
            claim(methods=self.methods, verifiers=self.verifiers, **kwargs),
        )
        self.assertEqual(refused.condition, condition, refused.reason)
        return refused


class StandardTests(DecisionTestMixin, unittest.TestCase):
    """auth.sasl_external = ["standard"]: XEP-0178 §3 with the xmppAddrs."""

    methods = ("standard",)

    # No xmppAddr.

    def test_no_identity_at_all(self) -> None:
        self.refuses("not-authorized")

    def test_no_identity_with_authzid(self) -> None:
        # MongooseIM 3.3 accepted any authzid on the right domain here (its quirk 5).
        self.refuses("not-authorized", authzid="mike@localhost")

    def test_cn_only(self) -> None:
        self.refuses("not-authorized", common_name="john")

    def test_cn_only_with_authzid(self) -> None:
        self.refuses("not-authorized", common_name="john", authzid="john@localhost")

    # One xmppAddr.

    def test_one_xmpp_addr_without_authzid(self) -> None:
        self.accepts("bob@localhost", xmpp_addrs=["bob@localhost"], common_name="bob")

    def test_one_xmpp_addr_with_the_same_authzid(self) -> None:
        # MongooseIM 3.3 answered invalid-authzid even though the authzid is the certificate's.
        self.accepts("bob@localhost", xmpp_addrs=["bob@localhost"], authzid="bob@localhost")

    def test_authzid_compared_after_normalisation(self) -> None:
        self.accepts("bob@localhost", xmpp_addrs=["bob@localhost"], authzid="BOB@LocalHost/desk")
        self.accepts("bob@localhost", xmpp_addrs=["Bob@LOCALHOST"], authzid="bob@localhost")

    def test_one_xmpp_addr_with_another_authzid(self) -> None:
        self.refuses("not-authorized", xmpp_addrs=["bob@localhost"], authzid="alice@localhost")

    def test_authzid_that_is_not_a_user_jid(self) -> None:
        for authzid in ("localhost", "bob@", "b ob@localhost", "@localhost"):
            self.refuses("invalid-authzid", xmpp_addrs=["bob@localhost"], authzid=authzid)

    def test_xmpp_addr_with_a_resource(self) -> None:
        self.accepts("bob@localhost", xmpp_addrs=["bob@localhost/laptop"])

    def test_xmpp_addr_on_another_served_domain(self) -> None:
        self.refuses("not-authorized", xmpp_addrs=["bob@example.net"])

    def test_xmpp_addr_on_a_domain_not_served(self) -> None:
        refused = self.refuses("not-authorized", xmpp_addrs=["bob@fed1"])
        self.assertIn("not served", refused.reason)

    def test_authzid_on_a_domain_not_served(self) -> None:
        self.refuses("not-authorized", xmpp_addrs=["bob@fed1"], authzid="bob@fed1")

    def test_xmpp_addr_that_is_not_a_user_jid(self) -> None:
        self.refuses("not-authorized", xmpp_addrs=["localhost"])
        self.refuses("not-authorized", xmpp_addrs=["bad user@localhost"])

    # Several xmppAddrs.

    def test_several_xmpp_addrs_without_authzid(self) -> None:
        # MongooseIM 3.3 answered not-authorized; XEP-0178 says invalid-authzid.
        self.refuses("invalid-authzid", xmpp_addrs=["kate@localhost", "kate@fed1"])

    def test_several_xmpp_addrs_with_one_of_them(self) -> None:
        self.accepts(
            "kate@localhost", xmpp_addrs=["kate@fed1", "kate@localhost"], authzid="kate@localhost"
        )
        both = ["alice@localhost", "bob@localhost"]
        self.accepts("bob@localhost", xmpp_addrs=both, authzid="bob@localhost")

    def test_several_xmpp_addrs_authzid_normalised(self) -> None:
        # MongooseIM 3.3 compared the strings byte for byte.
        self.accepts(
            "kate@localhost", xmpp_addrs=["kate@fed1", "Kate@LocalHost"], authzid="kate@localhost"
        )

    def test_several_xmpp_addrs_authzid_not_among_them(self) -> None:
        self.refuses(
            "not-authorized", xmpp_addrs=["kate@localhost", "kate@fed1"], authzid="alice@localhost"
        )

    def test_full_jid_compared_not_just_the_user_name(self) -> None:
        # grace's certificate names grace on other servers, never on this one.
        self.refuses(
            "not-authorized", xmpp_addrs=["grace@fed1", "grace@reg1"], authzid="grace@localhost"
        )

    def test_several_xmpp_addrs_authzid_on_another_domain(self) -> None:
        self.refuses(
            "not-authorized", xmpp_addrs=["kate@localhost", "kate@fed1"], authzid="kate@fed1"
        )

    def test_entries_that_are_not_jids(self) -> None:
        # They still make the certificate one with several identities, but never match.
        addrs = ["not a jid", "kate@localhost"]
        self.refuses("invalid-authzid", xmpp_addrs=addrs)
        self.accepts("kate@localhost", xmpp_addrs=addrs, authzid="kate@localhost")
        self.refuses("invalid-authzid", xmpp_addrs=addrs, authzid="not a jid")


class CommonNameTests(DecisionTestMixin, unittest.TestCase):
    """auth.sasl_external = ["standard", "common_name"] (MongooseIM's use_common_name)."""

    methods = ("standard", "common_name")

    def test_cn_without_authzid(self) -> None:
        self.accepts("john@localhost", common_name="john")

    def test_cn_with_matching_authzid(self) -> None:
        self.accepts("john@localhost", common_name="john", authzid="john@localhost")
        self.accepts("john@localhost", common_name="John", authzid="JOHN@localhost/x")

    def test_cn_with_another_authzid(self) -> None:
        # XEP-0178 §3: the mapped JID does not match the authzid.
        self.refuses("invalid-authzid", common_name="not-mike", authzid="mike@localhost")

    def test_cn_with_authzid_on_another_domain(self) -> None:
        self.refuses("invalid-authzid", common_name="john", authzid="john@example.net")

    def test_cn_with_malformed_authzid(self) -> None:
        self.refuses("invalid-authzid", common_name="john", authzid="john@")

    def test_cn_that_is_not_a_localpart(self) -> None:
        self.refuses("not-authorized", common_name="John Smith")
        self.refuses("not-authorized", common_name="j" * 1024)
        self.refuses("not-authorized", common_name="john@localhost")

    def test_no_cn_no_xmpp_addr(self) -> None:
        self.refuses("not-authorized")
        self.refuses("not-authorized", authzid="mike@localhost")

    def test_xmpp_addrs_take_precedence_over_the_cn(self) -> None:
        self.accepts("bob@localhost", xmpp_addrs=["bob@localhost"], common_name="robert")
        self.refuses("not-authorized", xmpp_addrs=["bob@fed1"], common_name="bob")

    def test_several_xmpp_addrs_without_authzid(self) -> None:
        self.refuses(
            "invalid-authzid", xmpp_addrs=["kate@localhost", "kate@fed1"], common_name="kate"
        )

    def test_prefix_and_suffix(self) -> None:
        self.accepts("cert-john-x@localhost", common_name="john", prefix="cert-", suffix="-x")
        self.accepts(
            "cert-john@localhost", common_name="john", prefix="cert-", authzid="cert-john@localhost"
        )
        self.refuses(
            "invalid-authzid", common_name="john", prefix="cert-", authzid="john@localhost"
        )

    def test_order_does_not_change_the_outcome(self) -> None:
        self.methods = ("common_name", "standard")
        self.accepts("john@localhost", common_name="john")
        self.accepts("bob@localhost", xmpp_addrs=["bob@localhost"], common_name="robert")
        self.refuses(
            "invalid-authzid", xmpp_addrs=["kate@localhost", "kate@fed1"], common_name="kate"
        )

    def test_common_name_alone(self) -> None:
        self.methods = ("common_name",)
        self.accepts("john@localhost", common_name="john")
        refused = self.refuses("not-authorized", xmpp_addrs=["bob@localhost"], common_name="bob")
        self.assertIn("no identity", refused.reason)


class AuthIdTests(DecisionTestMixin, unittest.TestCase):
    """auth.sasl_external = ["standard", "auth_id"] (MongooseIM's allow_just_user_identity)."""

    methods = ("standard", "auth_id")

    def test_authzid_trusted_without_xmpp_addr(self) -> None:
        self.accepts("mike@localhost", common_name="not-mike", authzid="mike@localhost")
        self.accepts("mike@localhost", authzid="Mike@localhost/phone")

    def test_no_authzid(self) -> None:
        self.refuses("not-authorized", common_name="john")

    def test_authzid_on_another_domain(self) -> None:
        self.refuses("not-authorized", authzid="mike@fed1")
        self.refuses("not-authorized", authzid="mike@example.net")

    def test_malformed_authzid(self) -> None:
        self.refuses("invalid-authzid", authzid="@localhost")

    def test_never_overrides_the_xmpp_addrs(self) -> None:
        self.refuses("not-authorized", xmpp_addrs=["bob@localhost"], authzid="alice@localhost")
        self.refuses("invalid-authzid", xmpp_addrs=["bob@localhost", "bob@fed1"])
        self.accepts("bob@localhost", xmpp_addrs=["bob@localhost"])

    def test_after_a_common_name_refusal(self) -> None:
        # Methods are tried until one accepts: the authzid is trusted once the CN did not match.
        self.methods = ("common_name", "auth_id")
        self.accepts("mike@localhost", common_name="not-mike", authzid="mike@localhost")
        self.accepts("john@localhost", common_name="john")


class PluginMethodTests(DecisionTestMixin, unittest.TestCase):
    methods = ("serial", "standard")

    def setUp(self) -> None:
        self.registry = ServerRegistry()

        def serial(claim: ExternalClaim) -> Identity | None:
            if claim.identities.common_name == "employee-7":
                return Identity("seven", claim.domain)
            if claim.identities.common_name == "elsewhere":
                return Identity("seven", "fed1")
            if claim.identities.common_name == "fired":
                raise CertificateRefused("not-authorized", "employee left")
            return None

        self.registry.add_verification_method("serial", serial)
        self.verifiers = self.registry.verification_methods

    def test_accepts(self) -> None:
        self.accepts("seven@localhost", common_name="employee-7")

    def test_abstains(self) -> None:
        self.accepts("bob@localhost", xmpp_addrs=["bob@localhost"], common_name="bob")

    def test_refuses(self) -> None:
        refused = self.refuses("not-authorized", common_name="fired")
        self.assertEqual(refused.reason, "serial: employee left")

    def test_identity_must_be_on_the_stream_domain(self) -> None:
        self.refuses("not-authorized", common_name="elsewhere")

    def test_names_are_unique(self) -> None:
        self.assertRaises(ValueError, self.registry.add_verification_method, "standard", print)

    def test_registries_are_per_server(self) -> None:
        self.assertNotIn("serial", ServerRegistry().verification_methods)
        self.assertNotIn("serial", certs.BUILTIN_VERIFICATION_METHODS)
        with self.assertRaises(TypeError):
            certs.BUILTIN_VERIFICATION_METHODS["serial"] = print  # type: ignore[index]

    def test_unknown_condition(self) -> None:
        self.assertRaises(ValueError, CertificateRefused, "forbidden", "no")


# The whole grid: xmppAddrs (none, bob@localhost, bob@localhost + bob@fed1) x CN (none, "bob") x
# authzid (none, the certificate's, another account, malformed) x methods. "NA" is
# not-authorized, "IA" invalid-authzid, otherwise the localpart accepted on localhost.
GRID = """
addrs cn   authzid          standard  standard,common_name  standard,auth_id
0     -    -                NA        NA                    NA
0     -    bob@localhost    NA        NA                    bob
0     -    alice@localhost  NA        NA                    alice
0     -    bob@             NA        NA                    IA
0     bob  -                NA        bob                   NA
0     bob  bob@localhost    NA        bob                   bob
0     bob  alice@localhost  NA        IA                    alice
0     bob  bob@             NA        IA                    IA
1     -    -                bob       bob                   bob
1     -    bob@localhost    bob       bob                   bob
1     -    alice@localhost  NA        NA                    NA
1     -    bob@             IA        IA                    IA
1     bob  -                bob       bob                   bob
1     bob  bob@localhost    bob       bob                   bob
1     bob  alice@localhost  NA        NA                    NA
1     bob  bob@             IA        IA                    IA
2     -    -                IA        IA                    IA
2     -    bob@localhost    bob       bob                   bob
2     -    alice@localhost  NA        NA                    NA
2     -    bob@             IA        IA                    IA
2     bob  -                IA        IA                    IA
2     bob  bob@localhost    bob       bob                   bob
2     bob  alice@localhost  NA        NA                    NA
2     bob  bob@             IA        IA                    IA
"""

ADDRS = {"0": (), "1": ("bob@localhost",), "2": ("bob@localhost", "bob@fed1")}
CONDITIONS = {"NA": "not-authorized", "IA": "invalid-authzid"}


class DecisionGridTests(unittest.TestCase):
    def test_every_row(self) -> None:
        header, *rows = (line.split() for line in GRID.strip().splitlines())
        method_lists = [tuple(column.split(",")) for column in header[3:]]
        self.assertEqual(len(rows), 24)
        for addrs, cn, authzid, *expected in rows:
            for methods, outcome in zip(method_lists, expected, strict=True):
                row = (addrs, cn, authzid, methods)
                attempt = claim(
                    ADDRS[addrs],
                    None if authzid == "-" else authzid,
                    None if cn == "-" else cn,
                    methods,
                )
                try:
                    decision = certs.verify_external_identity(attempt)
                except CertificateRefused as refused:
                    self.assertEqual(refused.condition, CONDITIONS.get(outcome), row)
                else:
                    self.assertEqual(decision.identity, Identity(outcome, DOMAIN), row)
