"""The directly written basic.publish frames, read back with pika's own frame decoder."""

import pika.frame
import pika.spec
from twisted.trial import unittest

from mim_twisted.events.amqp import MAX_BODY_FRAME, publish_frames, short_string


def decode_all(data: bytes) -> list:
    frames = []
    while data:
        used, frame = pika.frame.decode_frame(data)
        assert frame is not None and used > 0, data[:40]
        frames.append(frame)
        data = data[used:]
    return frames


class PublishFramesTests(unittest.TestCase):
    def publish(self, body: bytes) -> list:
        key = short_string("bob@localhost.chat_msg_recv")
        return decode_all(publish_frames(7, short_string("chat_msg"), key, body))

    def test_as_pika_reads_them(self) -> None:
        method, header, body = self.publish(b'{"message":"hi"}')
        self.assertEqual(method.channel_number, 7)
        self.assertIsInstance(method.method, pika.spec.Basic.Publish)
        self.assertEqual(method.method.exchange, "chat_msg")
        self.assertEqual(method.method.routing_key, "bob@localhost.chat_msg_recv")
        self.assertFalse(method.method.mandatory or method.method.immediate)
        self.assertEqual(header.body_size, 16)
        self.assertEqual(header.properties.delivery_mode, None)  # no properties, as MongooseIM
        self.assertEqual(body.fragment, b'{"message":"hi"}')

    def test_a_long_body_goes_in_several_frames(self) -> None:
        body = bytes(range(256)) * 100  # 25,600 bytes
        method, header, *fragments = self.publish(body)
        self.assertEqual(header.body_size, len(body))
        self.assertEqual(len(fragments), -(-len(body) // MAX_BODY_FRAME))
        self.assertEqual(b"".join(f.fragment for f in fragments), body)
        self.assertTrue(all(len(f.fragment) <= MAX_BODY_FRAME for f in fragments))

    def test_an_empty_body_has_no_body_frame(self) -> None:
        method, header = self.publish(b"")
        self.assertEqual(header.body_size, 0)

    def test_short_strings(self) -> None:
        self.assertEqual(short_string("é"), b"\x02\xc3\xa9")
        self.assertEqual(len(short_string("x" * 255)), 256)
        self.assertRaises(ValueError, short_string, "x" * 256)
