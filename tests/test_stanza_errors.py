"""Error replies echo the request (RFC 6120 §8.3.1) unless it carries a credential."""

from twisted.trial import unittest
from twisted.words.protocols.jabber.error import StanzaError

from mim_twisted.xmpp.stanza_errors import error_response
from tests.imsupport import error_condition, parse


def payloads(reply) -> list[tuple[str, str]]:
    """What the reply carries besides its <error/>."""
    return [(child.uri, child.name) for child in reply.elements() if child.name != "error"]


class ErrorResponseTests(unittest.TestCase):
    def reply(self, xml: str):
        request = parse(xml)
        before = request.toXml()
        reply = error_response(StanzaError("service-unavailable"), request)
        self.assertEqual(request.toXml(), before, "the request itself is left as it was")
        self.assertEqual(error_condition(reply), "service-unavailable")
        self.assertEqual(
            (reply["from"], reply["to"], reply["id"]), ("b@localhost", "a@localhost/r", "q1")
        )
        return reply

    def test_a_plain_request_is_echoed(self) -> None:
        reply = self.reply(
            "<iq type='get' id='q1' from='a@localhost/r' to='b@localhost'>"
            "<query xmlns='urn:example:q'/></iq>"
        )
        self.assertEqual(payloads(reply), [("urn:example:q", "query")])

    def test_a_password_change_is_not_echoed(self) -> None:
        reply = self.reply(
            "<iq type='set' id='q1' from='a@localhost/r' to='b@localhost'>"
            "<query xmlns='jabber:iq:register'><username>a</username>"
            "<password>hunter2</password></query></iq>"
        )
        self.assertEqual(payloads(reply), [])
        self.assertNotIn("hunter2", reply.toXml())

    def test_a_private_form_field_is_not_echoed(self) -> None:
        reply = self.reply(
            "<iq type='set' id='q1' from='a@localhost/r' to='b@localhost'>"
            "<command xmlns='http://jabber.org/protocol/commands' node='passwd'>"
            "<x xmlns='jabber:x:data' type='submit'><field var='pin' type='text-private'>"
            "<value>4711</value></field></x></command></iq>"
        )
        self.assertNotIn("4711", reply.toXml())

    def test_a_message_body_is_echoed(self) -> None:
        reply = self.reply(
            "<message id='q1' from='a@localhost/r' to='b@localhost'><body>hi</body></message>"
        )
        self.assertIn(("jabber:client", "body"), payloads(reply))
