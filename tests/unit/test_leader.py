"""The leader's background loops (operator/runbook_operator/leader.py): once the Lease is lost, ``on_lost`` is
called once and nothing renews any more; a release stops both loops. The Lease itself against the real API
server: tests/integration/test_leader.py."""

from __future__ import annotations

import threading
import time

from runbook_operator.leader import Elector
from tests.fake_api import FakeApi

RETRY, DEADLINE = 0.02, 0.1


class Scripted(Elector):
    """A leader whose renewals raise (an unreachable API server) or answer ``renewed``."""

    def __init__(self, *, renewed: bool | None) -> None:
        super().__init__(
            FakeApi(),
            "ns",
            "lease",
            holder="me",
            duration=0.2,
            renew_deadline=DEADLINE,
            retry_period=RETRY,
            clock=time.monotonic,
            on_lost=lambda: self.lost.append(time.monotonic()),
        )
        self.renewed = renewed
        self.renewals = 0
        self.lost: list[float] = []
        self._renewed = time.monotonic()  # as after a successful acquire

    def renew(self) -> bool:
        self.renewals += 1
        if self.renewed is None:
            raise TimeoutError("API server unreachable")
        if self.renewed:
            self._renewed = self.clock()
        return self.renewed


def lease_threads(before: set[threading.Thread]) -> set[threading.Thread]:
    return {t for t in set(threading.enumerate()) - before if t.name.startswith("lease-")}


def wait_ended(threads: set[threading.Thread], timeout: float = 2.0) -> bool:
    for thread in threads:
        thread.join(timeout)
    return not any(t.is_alive() for t in threads)


def test_unreachable_leader_is_lost_once_and_stops_renewing() -> None:
    leader = Scripted(renewed=None)
    before = set(threading.enumerate())
    leader.hold()
    started = lease_threads(before)
    try:
        assert len(started) == 2  # the renewal and the watchdog
        assert wait_ended(started), "a thread went on after the Lease was lost"
        assert len(leader.lost) == 1
        renewals = leader.renewals
        time.sleep(5 * RETRY)
        assert leader.renewals == renewals and len(leader.lost) == 1  # no renewal after the loss
    finally:
        leader.release()


def test_another_holder_is_lost_once_and_the_watchdog_stops_too() -> None:
    leader = Scripted(renewed=False)
    before = set(threading.enumerate())
    leader.hold()
    started = lease_threads(before)
    try:
        assert wait_ended(started)
        time.sleep(2 * DEADLINE)  # past the deadline: the watchdog, stopped, does not report it again
        assert leader.renewals == 1 and len(leader.lost) == 1
    finally:
        leader.release()


def test_release_stops_both_loops_without_a_loss() -> None:
    leader = Scripted(renewed=True)
    before = set(threading.enumerate())
    leader.hold()
    started = lease_threads(before)
    time.sleep(3 * RETRY)
    leader.release()
    assert wait_ended(started)
    renewals = leader.renewals
    time.sleep(2 * DEADLINE)
    assert renewals >= 1 and leader.renewals == renewals and leader.lost == []
