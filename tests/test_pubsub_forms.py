"""Submitted forms read once per shape: the same answer, a copy each time, errors every time."""

from twisted.trial import unittest
from twisted.words.protocols.jabber import error

from mim_twisted.pubsub import forms
from tests.imsupport import parse
from tests.test_pubsub_protocol import field, form, twice


class SubmittedValuesTests(unittest.TestCase):
    def setUp(self) -> None:
        forms._READ.clear()
        self.addCleanup(forms._READ.clear)

    def values(self, xml: str, namespace: str = forms.NS_PUBLISH_OPTIONS) -> dict | None:
        return forms.submitted_values(parse(xml), namespace)

    def test_the_same_form_gives_the_same_values_each_its_own_copy(self) -> None:
        xml = form("publish-options", field("pubsub#access_model", "open"))
        first = self.values(xml)
        first["pubsub#access_model"] = "changed by the caller"
        self.assertEqual(self.values(xml), {"pubsub#access_model": "open"})
        self.assertEqual(len(forms._READ), 1)

    def test_lists_are_copied(self) -> None:
        xml = form(
            "publish-options",
            "<field var='multi' type='text-multi'><value>a</value><value>b</value></field>",
        )
        self.values(xml)["multi"].append("c")
        self.assertEqual(self.values(xml)["multi"], ["a", "b"])

    def test_another_value_another_form(self) -> None:
        self.values(form("publish-options", field("pubsub#access_model", "open")))
        values = self.values(form("publish-options", field("pubsub#access_model", "presence")))
        self.assertEqual(values["pubsub#access_model"], "presence")

    def test_a_bad_form_is_refused_every_time(self) -> None:
        xml = form("publish-options", twice("pubsub#access_model"))
        for _ in range(2):
            self.assertRaises(error.StanzaError, self.values, xml)
        other = form("node_config", field("pubsub#access_model", "open"))
        for _ in range(2):
            self.assertRaises(error.StanzaError, self.values, other)
        self.assertEqual(self.values(other, forms.NS_NODE_CONFIG)["pubsub#access_model"], "open")

    def test_a_cancelled_form_is_none(self) -> None:
        xml = "<x xmlns='jabber:x:data' type='cancel'/>"
        self.assertIsNone(self.values(xml))
        self.assertIsNone(self.values(xml))

    def test_large_forms_are_not_kept(self) -> None:
        xml = form("publish-options", field("pubsub#title", "x" * forms.MAX_FORM_SIZE))
        self.assertEqual(self.values(xml)["pubsub#title"], "x" * forms.MAX_FORM_SIZE)
        self.assertEqual(forms._READ, {})

    def test_forms_of_many_elements_or_long_names_are_not_kept(self) -> None:
        # No text and no attribute values, but each element's shape takes memory: a stanza of
        # empty elements would otherwise keep megabytes per form.
        many = form("publish-options", "<unknown/>" * 1000)
        self.assertEqual(self.values(many), {})
        long_name = form("publish-options", f"<{'n' * forms.MAX_FORM_SIZE}/>")
        self.assertEqual(self.values(long_name), {})
        namespaced = form("publish-options", f"<a xmlns='{'u' * forms.MAX_FORM_SIZE}'/>")
        self.assertEqual(self.values(namespaced), {})
        attribute = form("publish-options", f"<a {'b' * forms.MAX_FORM_SIZE}='c'/>")
        self.assertEqual(self.values(attribute), {})
        self.assertEqual(forms._READ, {})

    def test_the_publish_options_form_of_omemo_is_kept(self) -> None:
        xml = form("publish-options", field("pubsub#access_model", "open"))
        self.values(xml)
        self.assertEqual(len(forms._READ), 1)

    def test_the_number_kept_is_bounded(self) -> None:
        for n in range(forms.MAX_FORMS_READ + 1):
            self.values(form("publish-options", field("pubsub#title", str(n))))
        self.assertEqual(len(forms._READ), 1)
