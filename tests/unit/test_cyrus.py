"""What the installed Cyrus's version means (cyrushelper/cyrus.py)."""

from __future__ import annotations

import pytest

from cyrushelper import cyrus


@pytest.mark.parametrize("said, version, ready_file, hang", [
    ("cyrus-imapd 3.6.1-Debian-3.6.1-4+deb12u5", (3, 6, 1), False, True),     # Debian 12
    ("cyrus-imapd 3.10.2-Debian-3.10.2-1+deb13u2", (3, 10, 2), True, False),  # Debian 13
    ("cyrus-imapd 3.10.1", (3, 10, 1), True, True),
    ("cyrus-imapd 3.8.5", (3, 8, 5), False, True),
    ("cyrus-imapd 3.8.6", (3, 8, 6), False, False),
    ("cyrus-imapd 3.11.1", (3, 11, 1), True, True),    # a development series without the fix
    ("cyrus-imapd 3.12.0", (3, 12, 0), True, False),
    ("cyrus-imapd 3.13.0", (3, 13, 0), True, True),
    ("cyrus-imapd 3.13.1", (3, 13, 1), True, False),
    ("cyrus-imapd 4.0", (4, 0, 0), True, False),
])
def test_version_and_what_it_does(said, version, ready_file, hang):
    assert cyrus.parse_version(said) == version
    assert cyrus.has_ready_file(version) is ready_file
    assert cyrus.has_shutdown_hang(version) is hang


def test_unknown_version_gets_the_harmless_workaround_and_probes():
    assert cyrus.parse_version("master: unknown option -V") is None
    assert cyrus.has_shutdown_hang(None) and not cyrus.has_ready_file(None)
