"""synclog.LineCounter: the counts run's STATUS keeps between updates."""

from __future__ import annotations

import os

from cyrushelper import synclog


def counted(tmp_path, data: bytes, lines: int):
    """A log holding `data`, and a counter that counted it once."""
    log = tmp_path / "log"
    log.write_bytes(data)
    counter = synclog.LineCounter()
    assert counter(log) == lines
    return log, counter


def test_a_grown_file_is_read_from_where_the_last_count_stopped(tmp_path):
    log, counter = counted(tmp_path, b"APPEND a\nAPPEND b\n", 2)
    with open(log, "r+b") as f:   # change what was counted (same size, same file) ...
        f.write(b"APPEND a APPEND b ")
    with open(log, "ab") as f:    # ... and append a line: only the new bytes are read
        f.write(b"APPEND c\n")
    assert counter(log) == 3 and synclog.count_lines(log) == 1
    counter.forget(tmp_path)      # its directory changed: counted afresh
    assert counter(log) == 1


def test_another_file_or_a_shorter_one_is_counted_afresh(tmp_path):
    log, counter = counted(tmp_path, b"A a\nA b\nA c\n", 3)
    replacement = tmp_path / "new"
    replacement.write_bytes(b"A much longer line d\nA e\n")   # longer, fewer lines
    os.rename(replacement, log)   # another inode at the same name
    assert counter(log) == 2
    log.write_bytes(b"A h\n")     # truncated and rewritten: shorter than what was read
    assert counter(log) == 1
    log.unlink()
    assert counter(log) == 0


def test_a_line_still_being_written_counts_when_its_newline_arrives(tmp_path):
    log, counter = counted(tmp_path, b"A a\nA b", 1)
    with open(log, "ab") as f:
        f.write(b"\n")
    assert counter(log) == 2
