"""The runner's enrolment retries: the backoff between attempts, and the keys every attempt
(and a restart) presents."""

from __future__ import annotations

import random
import stat
from pathlib import Path

import pytest

from mesh.cli.agent import ENROLMENT_KEY_FILE, enrol_backoff, enrolment_keys
from mesh.errors import InvalidArgument


def test_backoff_doubles_from_one_second_to_thirty_with_jitter() -> None:
    """Retry n waits within the upper half of min(30, 2**(n-1)) seconds."""
    rng = random.Random(7)
    for retry, step in ((1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (6, 30.0), (50, 30.0)):
        delays = {enrol_backoff(retry, rng) for _ in range(50)}
        assert all(step / 2 <= d <= step for d in delays), (retry, delays)
        assert len(delays) > 1  # jittered


def test_keys_are_saved_private_and_presented_again(tmp_path: Path) -> None:
    """The first call makes keys and saves them 0600; the next one (a retry or a restart)
    reads the same keys back."""
    first = enrolment_keys(tmp_path / "id")
    path = tmp_path / "id" / ENROLMENT_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = enrolment_keys(tmp_path / "id")
    assert (again.sign_pk, again.box_pk) == (first.sign_pk, first.box_pk)


def test_saved_keys_readable_by_others_are_refused(tmp_path: Path) -> None:
    """A pending key file with group or other permissions is refused, naming the fix."""
    enrolment_keys(tmp_path)
    (tmp_path / ENROLMENT_KEY_FILE).chmod(0o644)
    with pytest.raises(InvalidArgument, match="chmod 600"):
        enrolment_keys(tmp_path)


def test_a_corrupt_key_file_is_refused_with_the_way_out(tmp_path: Path) -> None:
    """Garbage in the pending key file is refused (not replaced: it may be what a redeemed
    token was delivered to), saying how to start over."""
    path = tmp_path / ENROLMENT_KEY_FILE
    path.write_text("garbage")
    path.chmod(0o600)
    with pytest.raises(InvalidArgument, match="delete it to start over"):
        enrolment_keys(tmp_path)
