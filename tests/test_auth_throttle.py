"""The failed-login budgets as pure logic, on a clock the tests move by hand."""

from twisted.trial import unittest

from mim_twisted.auth.throttle import (
    AuthFailureBudget,
    DrainingCounts,
    FailureBudgetSettings,
    address_key,
)

ALICE = "alice@localhost"
BOB = "bob@localhost"


class AddressKeyTests(unittest.TestCase):
    def test_ipv4_as_it_is(self) -> None:
        self.assertEqual(address_key("192.0.2.7"), "192.0.2.7")

    def test_ipv6_by_its_64(self) -> None:
        self.assertEqual(address_key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64")
        self.assertEqual(address_key("2001:db8:1:2:bbbb::9"), "2001:db8:1:2::/64")
        self.assertNotEqual(address_key("2001:db8:1:3::1"), address_key("2001:db8:1:2::1"))

    def test_ipv4_mapped_ipv6_is_ipv4(self) -> None:
        self.assertEqual(address_key("::ffff:192.0.2.7"), "192.0.2.7")

    def test_not_an_ip_address(self) -> None:
        self.assertEqual(address_key("?"), "?")


class DrainingCountsTests(unittest.TestCase):
    def test_failures_drain_at_capacity_per_window(self) -> None:
        counts = DrainingCounts(4, 100.0, 10)
        for _ in range(4):
            counts.add_failure("k", 0.0)
        self.assertTrue(counts.spent("k", 0.0))
        self.assertEqual(counts.failures("k", 50.0), 2.0)
        self.assertFalse(counts.spent("k", 50.0))

    def test_drained_keys_are_forgotten(self) -> None:
        counts = DrainingCounts(4, 100.0, 10)
        counts.add_failure("k", 0.0)
        self.assertEqual(counts.failures("k", 100.0), 0.0)
        self.assertEqual(len(counts), 0)

    def test_at_most_max_keys_least_recently_failed_dropped(self) -> None:
        counts = DrainingCounts(1, 100.0, 3)
        for index, key in enumerate("abcd"):
            counts.add_failure(key, float(index))
        self.assertEqual(len(counts), 3)
        self.assertFalse(counts.spent("a", 4.0))
        self.assertTrue(all(counts.spent(key, 4.0) for key in "bcd"))

    def test_capacity_zero_counts_nothing(self) -> None:
        counts = DrainingCounts(0, 100.0, 3)
        counts.add_failure("k", 0.0)
        self.assertFalse(counts.spent("k", 0.0))
        self.assertEqual(len(counts), 0)


class AuthFailureBudgetTests(unittest.TestCase):
    def budget(self, **settings: object) -> AuthFailureBudget:
        values = {"address_failures": 3, "account_failures": 5, "window": 60.0}
        values.update(settings)
        return AuthFailureBudget(FailureBudgetSettings(**values))

    def fail_logins(self, budget: AuthFailureBudget, times: int, address: str, account, now=0.0):
        for _ in range(times):
            self.assertIsNone(budget.refusal(address, account, now))
            budget.record_failure(address, account, now)

    def test_address_budget_refuses_every_account_from_that_address(self) -> None:
        budget = self.budget()
        self.fail_logins(budget, 3, "192.0.2.1", ALICE)
        for account in (None, ALICE, BOB):
            self.assertIn("address", budget.refusal("192.0.2.1", account, 1.0))
        self.assertIsNone(budget.refusal("192.0.2.2", ALICE, 1.0))

    def test_failures_without_an_account_count_for_the_address(self) -> None:
        budget = self.budget()
        self.fail_logins(budget, 3, "192.0.2.1", None)
        self.assertIsNotNone(budget.refusal("192.0.2.1", None, 0.0))

    def test_address_budget_refills_over_the_window(self) -> None:
        budget = self.budget()
        self.fail_logins(budget, 3, "192.0.2.1", ALICE)
        self.assertIsNotNone(budget.refusal("192.0.2.1", ALICE, 19.0))
        # One more attempt after window / budget seconds, all of them after the window.
        self.assertIsNone(budget.refusal("192.0.2.1", ALICE, 20.5))
        self.fail_logins(budget, 3, "192.0.2.1", BOB, now=60.0)

    def test_one_ipv6_host_cannot_walk_its_64(self) -> None:
        budget = self.budget()
        for host in ("2001:db8::1", "2001:db8::2", "2001:db8::3"):
            self.fail_logins(budget, 1, host, ALICE)
        self.assertIsNotNone(budget.refusal("2001:db8::4", None, 0.0))
        self.assertIsNone(budget.refusal("2001:db8:0:1::1", None, 0.0))

    def test_spent_account_refuses_the_addresses_that_failed_on_it(self) -> None:
        budget = self.budget()
        guessers = [f"198.51.100.{n}" for n in range(5)]
        for guesser in guessers:
            self.fail_logins(budget, 1, guesser, ALICE)
        for guesser in guessers:
            self.assertIn("account", budget.refusal(guesser, ALICE, 1.0))
            # Only for that account.
            self.assertIsNone(budget.refusal(guesser, BOB, 1.0))

    def test_spent_account_never_refuses_an_address_that_did_not_fail(self) -> None:
        budget = self.budget()
        for n in range(50):
            budget.record_failure(f"198.51.100.{n}", ALICE, 0.0)
        self.assertIsNone(budget.refusal("192.0.2.99", ALICE, 0.0))

    def test_before_the_account_budget_is_spent_failed_addresses_may_retry(self) -> None:
        budget = self.budget(address_failures=10)
        self.fail_logins(budget, 4, "192.0.2.1", ALICE)
        self.assertIsNone(budget.refusal("192.0.2.1", ALICE, 0.0))

    def test_an_address_refused_for_an_account_waits_at_most_the_window(self) -> None:
        budget = self.budget(address_failures=100)
        self.fail_logins(budget, 5, "192.0.2.1", ALICE)
        # The guessing goes on elsewhere, so the account budget stays spent.
        for second in range(10, 60, 10):
            budget.record_failure(f"198.51.100.{second}", ALICE, float(second))
        self.assertIsNotNone(budget.refusal("192.0.2.1", ALICE, 59.0))
        budget.record_failure("198.51.100.60", ALICE, 60.0)
        self.assertIsNotNone(budget.refusal("198.51.100.60", ALICE, 60.0))
        self.assertIsNone(budget.refusal("192.0.2.1", ALICE, 60.0))

    def test_a_peer_without_an_ip_address_has_only_the_account_budget(self) -> None:
        budget = self.budget()
        # A UNIX socket's clients: no address budget, one guesser locks no one else out.
        for account in (None, BOB, "carol@localhost", "dave@localhost"):
            self.fail_logins(budget, 3, None, account)
        self.assertIsNone(budget.refusal(None, ALICE, 0.0))
        # The account budget still holds them back, together.
        self.fail_logins(budget, 5, None, ALICE)
        self.assertIn("account", budget.refusal(None, ALICE, 0.0))
        self.assertIsNone(budget.refusal("192.0.2.1", ALICE, 0.0))

    def test_budgets_of_zero_are_off(self) -> None:
        budget = self.budget(address_failures=0, account_failures=0)
        for _ in range(100):
            budget.record_failure("192.0.2.1", ALICE, 0.0)
        self.assertIsNone(budget.refusal("192.0.2.1", ALICE, 0.0))

    def test_memory_is_bounded_when_accounts_and_addresses_are_sprayed(self) -> None:
        budget = self.budget(max_tracked=100)
        for n in range(1000):
            budget.record_failure(f"10.0.{n // 256}.{n % 256}", f"user{n}@localhost", 0.0)
        self.assertLessEqual(len(budget._addresses), 100)
        self.assertLessEqual(len(budget._accounts), 100)
        self.assertLessEqual(len(budget._pairs), 100)

    def test_pairs_older_than_the_window_are_dropped(self) -> None:
        budget = self.budget()
        budget.record_failure("192.0.2.1", ALICE, 0.0)
        budget.record_failure("192.0.2.2", BOB, 61.0)
        self.assertEqual(list(budget._pairs), [(BOB, "192.0.2.2")])
