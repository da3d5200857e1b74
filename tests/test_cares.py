"""The aiodns/pycares internals spfpolicy relies on (src/spfpolicy/cares.py)
are all there in the installed versions. When an upgrade removes one, this
fails naming it: see cares.py for what each is used for and what spfpolicy
falls back to without it."""

from __future__ import annotations

import aiodns
import pycares

from spfpolicy import cares


def test_every_private_name_is_there() -> None:
    missing = cares.missing_private_names()
    assert not missing, (
        f"aiodns {aiodns.__version__} / pycares {pycares.__version__} lack "
        f"{', '.join(missing)}: update src/spfpolicy/cares.py"
    )


def test_the_pieces_that_need_them_are_on() -> None:
    # Each piece turns itself off quietly when its names are missing; here
    # they must all be on, or the measured behaviour is not what runs.
    assert cares.KEEPS_NEGATIVE_REPLIES, "negative answers would keep DNS_Negative_TTL"
    assert callable(getattr(aiodns.DNSResolver, "_sock_state_cb", None))


def test_missing_names_are_reported(monkeypatch) -> None:
    monkeypatch.setattr(
        cares, "PRIVATE_NAMES", (*cares.PRIVATE_NAMES, ("pycares.Channel", "_no_such_name"))
    )
    assert cares.missing_private_names() == ["pycares.Channel._no_such_name"]
