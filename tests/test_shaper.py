"""The read shaper and its use by the C2S stream: a fast sender is paused, then resumed."""

from twisted.trial import unittest

from mim_twisted.xmpp.shaper import ReadShaper
from tests.test_c2s_stream import HEADER, StreamTestCase


class ReadShaperTests(unittest.TestCase):
    def test_within_the_burst_no_pause(self) -> None:
        shaper = ReadShaper(rate=1000, burst=1000, now=0.0)
        self.assertEqual(shaper.consume(600, 0.0), 0.0)
        self.assertEqual(shaper.consume(400, 0.0), 0.0)

    def test_beyond_the_burst_pause_until_paid_back(self) -> None:
        shaper = ReadShaper(rate=1000, burst=1000, now=0.0)
        self.assertAlmostEqual(shaper.consume(1500, 0.0), 0.5)

    def test_tokens_refill_with_time_up_to_the_burst(self) -> None:
        shaper = ReadShaper(rate=1000, burst=1000, now=0.0)
        shaper.consume(1000, 0.0)
        self.assertEqual(shaper.consume(500, 0.5), 0.0)
        self.assertAlmostEqual(shaper.consume(1000, 100.0), 0.0)
        self.assertAlmostEqual(shaper.consume(500, 100.0), 0.5)


class ShapedStreamTests(StreamTestCase):
    settings = {"max_read_rate": 2048}

    def test_a_fast_client_is_paused_and_resumed(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER + b" " * 3000)
        self.assertEqual(transport.producerState, "paused")
        self.clock.advance(1.0)
        self.assertEqual(transport.producerState, "producing")
        self.assertFalse(transport.disconnecting)

    def test_sasl_resuming_does_not_lift_the_shaper_pause(self) -> None:
        stream, transport = self.connect()
        stream.pause_reading("shaper")
        stream.pause_reading("sasl")
        stream.resume_reading("sasl")
        self.assertEqual(transport.producerState, "paused")
        stream.resume_reading("shaper")
        self.assertEqual(transport.producerState, "producing")

    def test_the_shaper_survives_a_drained_write_buffer(self) -> None:
        stream, transport = self.connect()
        stream.pauseProducing()
        stream.resumeProducing()
        stream.dataReceived(HEADER + b" " * 3000)
        self.assertEqual(transport.producerState, "paused")

    def test_data_while_paused_pushes_the_resumption_back(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER + b" " * 2500)  # about 0.3 s over the rate
        stream.dataReceived(b" " * 1000)  # about 0.8 s over in all
        self.clock.advance(0.5)
        self.assertEqual(transport.producerState, "paused")
        self.clock.advance(0.5)
        self.assertEqual(transport.producerState, "producing")
