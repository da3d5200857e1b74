"""memory.py: the per-message memory (bounded, expiring, replayed to a
message's later recipients) and the verdict memo (kept the second time a
key is seen, as long as the SPF outcomes behind it stay cached)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fakeclock import FakeClock
from policy_support import (
    MEMO_SPF,
    RELAY_SPF,
    CachingChecks,
    FakeChecks,
    outcome,
    request,
    settings_from,
)
from spfpolicy.config import Settings
from spfpolicy.deciding import Known, decide, decide_now
from spfpolicy.memory import InstanceMemory, VerdictMemo, replay
from spfpolicy.policy import Act, MemoryEntry, Verdict, to_decision
from spfpolicy.results import SpfResult


def test_memory_expires() -> None:
    clock = FakeClock()
    memory = InstanceMemory(max_entries=10, ttl=60, clock=clock)
    entry = MemoryEntry(Act.REJECT, "X")
    memory.put("a", entry)
    clock.now += 59.9
    assert memory.get("a") == entry
    clock.now += 0.1
    assert memory.get("a") is None
    assert len(memory) == 0


def test_memory_keeps_no_header_text() -> None:
    memory = InstanceMemory(clock=FakeClock())
    memory.put("a", MemoryEntry(Act.PREPEND, "Received-SPF: Pass ..."))
    remembered = memory.get("a")
    assert remembered is not None and remembered.act is Act.PREPEND and remembered.text == ""
    assert replay(remembered) == Verdict(Act.DUNNO, "Header already pre-pended", replayed=True)


def test_memory_evicts_least_recently_used() -> None:
    memory = InstanceMemory(max_entries=2, ttl=60, clock=FakeClock())
    for key in "abc":
        if key == "c":
            assert memory.get("a") is not None  # "a" is now the most recent
        memory.put(key, MemoryEntry(Act.PREPEND, key))
    assert memory.get("b") is None
    assert memory.get("a") is not None and memory.get("c") is not None
    assert len(memory) == 2


@pytest.mark.parametrize(("size", "ttl"), [(0, 60), (10, 0)])
def test_memory_can_be_disabled(size: int, ttl: float) -> None:
    memory = InstanceMemory(max_entries=size, ttl=ttl, clock=FakeClock())
    memory.put("a", MemoryEntry(Act.PREPEND, "X"))
    assert memory.get("a") is None


async def test_header_again_after_the_memory_expired(tmp_path: Path) -> None:
    clock = FakeClock()
    memory = InstanceMemory(ttl=10, clock=clock)
    settings = settings_from(tmp_path, ["Whitelist = 192.0.2.1"])
    checks = FakeChecks(RELAY_SPF)
    first = await decide(request(), settings, checks, memory)
    assert first.action.startswith("prepend X-Comment")
    assert (await decide(request(), settings, checks, memory)).action == "dunno"
    clock.now += 10
    assert (await decide(request(), settings, checks, memory)).action == first.action


@pytest.mark.parametrize(
    "other",
    [
        pytest.param({"instance": "i2"}, id="instance"),
        pytest.param({"client_address": "192.0.2.2"}, id="client"),
        pytest.param({"sender": "z@example.org"}, id="sender"),
        pytest.param({"instance": ""}, id="no-instance"),
    ],
)
async def test_memory_is_per_message(tmp_path: Path, other: dict[str, str]) -> None:
    memory = InstanceMemory()
    settings = settings_from(tmp_path, ["Whitelist = 192.0.2.0/24"])
    checks = FakeChecks(RELAY_SPF)
    await decide(request(**other), settings, checks, memory)
    again = await decide(request(), settings, checks, memory)
    assert again.action.startswith("prepend X-Comment")
    if other == {"instance": ""}:
        assert len(memory) == 1  # only the second request had an instance


# ------------------------------------------------------------ the verdict memo


async def test_memo_lives_as_long_as_the_cached_outcomes(tmp_path: Path) -> None:
    settings = settings_from(tmp_path, [])
    table = dict(MEMO_SPF)
    checks = CachingChecks(table)
    clock = FakeClock()
    memo = VerdictMemo(settings, 100, clock=clock)
    memory = InstanceMemory()
    first = decide_now(request(), settings, Known(checks), memory, memo)
    assert first is not None and first.result is SpfResult.SOFTFAIL
    assert len(memo) == 0  # a key seen once is only marked
    assert decide_now(request(instance="i1b"), settings, Known(checks), memory, memo) == first
    assert len(memo) == 1
    assert decide_now(request(instance="i2"), settings, Known(checks), memory, memo) == first
    assert (memo.hits, memo.checks_saved) == (1, 2)
    # The result cache's outcome expires (and is fetched again, different).
    table[("a@example.org", "mail.example.com")] = outcome("pass")
    clock.now += checks.lifetime
    again = decide_now(request(instance="i3"), settings, Known(checks), memory, memo)
    assert again is not None and again.result is SpfResult.PASS
    assert memo.hits == 1


async def test_uncached_outcomes_are_not_memoized(tmp_path: Path) -> None:
    settings = settings_from(tmp_path, [])
    checks = CachingChecks(MEMO_SPF)
    checks.lifetime = 0.0  # temperror, or Result_Cache_TTL = 0
    memo = VerdictMemo(settings, 100)
    assert decide_now(request(), settings, Known(checks), InstanceMemory(), memo) is not None
    assert len(memo) == 0


async def test_memo_is_bounded_and_per_settings(tmp_path: Path) -> None:
    settings = settings_from(tmp_path, [])
    checks = CachingChecks(MEMO_SPF)
    memo = VerdictMemo(settings, 2)
    for n, domain in enumerate(["a.example"] * 2 + ["b.example"] * 2 + ["c.example"] * 2):
        decide_now(
            request(instance=f"i{n}", recipient=f"x@{domain}"),
            settings,
            Known(checks),
            InstanceMemory(),
            memo,
        )
    assert len(memo) == 2
    assert not memo._seen  # all kept on their second sighting; a.example evicted
    other = settings_from(tmp_path, ["Header_Type = AR"])
    decide_now(request(recipient="x@b.example"), settings, Known(checks), InstanceMemory(), memo)
    assert memo.hits == 1
    decision = decide_now(
        request(recipient="x@b.example"), other, Known(checks), InstanceMemory(), memo
    )
    assert decision is not None
    assert decision.action.startswith("prepend Authentication-Results:")  # not the memo's
    assert memo.hits == 1


def test_memo_admits_a_key_the_second_time_it_is_seen() -> None:
    memo = VerdictMemo(Settings(), 100)
    key = ("192.0.2.1", "mail.example.com", "a@example.org", "@example.net")
    assert memo.admit(key) is False  # first sighting: only marked
    assert memo.admit(key) is True
    assert memo.admit(key) is False  # the mark was used up, and nothing was put
    assert VerdictMemo(Settings(), 0).admit(key) is False  # a memo of size 0 keeps nothing


def test_memo_key_shares_a_recipient_domain_without_per_user() -> None:
    memo = VerdictMemo(Settings(), 100)
    one = memo.key({"client_address": "192.0.2.1", "recipient": "b@example.net"})
    two = memo.key({"client_address": "192.0.2.1", "recipient": "c@example.net"})
    assert one == two == ("192.0.2.1", None, None, "@example.net")


@pytest.mark.parametrize("queue_id_setting", [True, False])
@pytest.mark.parametrize("queue_id", ["", "4Xy1Zq0AbC"])
@pytest.mark.parametrize(
    "act", [Act.PREPEND, Act.REJECT, Act.DEFER, Act.DUNNO, Act.RESULT_ONLY], ids=str
)
def test_memo_replays_what_to_decision_gives(
    queue_id_setting: bool, queue_id: str, act: Act
) -> None:
    settings = Settings(queue_id=queue_id_setting, test_only=1)
    memo = VerdictMemo(settings, 10)
    memory = InstanceMemory()
    memory.put("m", MemoryEntry(act, "550 Please see http://www.example/why"))
    remembered = memory.get("m")
    assert remembered is not None
    expected = to_decision(settings, queue_id, replay(remembered))
    first = memo.replayed(settings, queue_id, remembered)
    assert first == expected
    assert memo.replayed(settings, queue_id, remembered) == expected
    other = Settings(queue_id=queue_id_setting, test_only=0)  # Per_User, say
    assert memo.replayed(other, queue_id, remembered) == to_decision(
        other, queue_id, replay(remembered)
    )
    assert memo.replayed(settings, queue_id, remembered) == expected


def test_memo_replays_a_header_already_sent_with_one_decision() -> None:
    settings = Settings()
    memo = VerdictMemo(settings, 10)
    memory = InstanceMemory()
    memory.put("m", MemoryEntry(Act.PREPEND, "Received-SPF: Pass (mailfrom) ..."))
    remembered = memory.get("m")
    assert remembered is not None
    assert memo.replayed(settings, "", remembered) is memo.replayed(settings, "", remembered)
