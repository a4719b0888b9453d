"""examples/spam_detector.py, unchanged, reads what the server publishes."""

import asyncio
import json
import sys

from tests.e2e.harness import wait_for
from tests.e2e.test_event_pusher import EventPusherTestCase
from tests.test_spam_detector import SCRIPT


class SpamDetectorScriptTests(EventPusherTestCase):
    """The script, unchanged, reads what the server publishes."""

    async def test_flags_a_listed_word(self) -> None:
        process = await wait_for(
            asyncio.create_subprocess_exec(
                sys.executable,
                SCRIPT,
                "--exchange",
                self.chat,
                "--words",
                "lottery",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        )
        self.addCleanup(lambda: wait_for(process.wait()))
        self.addCleanup(process.terminate)
        # It says on standard error once it reads the exchange.
        await wait_for(process.stderr.readline())
        alice = await self.online("alice@localhost/home")
        bob = await self.online("bob@localhost/phone")
        alice.xmpp.send_message(mto="bob@localhost", mbody="hello", mtype="chat")
        bob.xmpp.send_message(mto="alice@localhost", mbody="You won the lottery", mtype="chat")
        flag = json.loads(await wait_for(process.stdout.readline()))
        self.assertEqual(
            flag,
            {
                "user": "bob@localhost",
                "to": "alice@localhost",
                "reasons": ["listed words: lottery"],
            },
        )
