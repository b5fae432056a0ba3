"""DirWatch: inotify on sync directories, including ones that appear later."""

from __future__ import annotations

import os

from cyrushelper.syncwatch import MODIFICATIONS, DirWatch, is_sync_log_name


def test_sync_log_names():
    assert all(is_sync_log_name(n) for n in ("log", "log-run", "log-1234"))
    assert not any(is_sync_log_name(n) for n in ("shutdown", "log.tmp", "logs", "log-abc"))


def test_append_rename_unlink_are_changes(tmp_path):
    with DirWatch() as w:
        w.add("default", tmp_path, is_sync_log_name)
        assert w.read() == {"default"}  # an existing directory may already hold files
        assert w.wait(0.2) == set()
        (tmp_path / "log").write_text("MAILBOX user.a\n")
        assert w.wait(2) == {"default"}
        os.rename(tmp_path / "log", tmp_path / "log-run")
        assert w.wait(2) == {"default"}
        os.unlink(tmp_path / "log-run")
        assert w.wait(2) == {"default"}
        (tmp_path / "unrelated").write_text("x")
        assert w.wait(0.3) == set()


def test_directory_created_later_is_followed(tmp_path):
    target = tmp_path / "sync" / "repl2"
    with DirWatch() as w:
        w.add("repl2", target, is_sync_log_name)
        assert w.read() == set()
        target.mkdir(parents=True)
        w.wait(1)
        (target / "log").write_text("SEEN a b\n")
        changed = w.wait(2)
        changed |= w.wait(0.2)
        assert "repl2" in changed


def test_burst_is_one_change(tmp_path):
    with DirWatch() as w:
        w.add("default", tmp_path, is_sync_log_name)
        w.read()
        with open(tmp_path / "log", "a") as f:
            for i in range(500):
                f.write(f"APPEND user.u{i}\n")
                f.flush()
        assert w.wait(2) == {"default"}


def test_single_file_target(tmp_path):
    with DirWatch() as w:
        w.add_file("ready", tmp_path / "master.ready")
        w.read()
        (tmp_path / "other").touch()
        assert w.wait(0.3) == set()
        (tmp_path / "master.ready").touch()
        assert w.wait(2) == {"ready"}


def test_one_change_per_closed_write_and_none_while_a_writer_keeps_the_file_open(tmp_path):
    """Cyrus closes the log after every line: the close is the event (WRITES). A file written in
    place without a close is seen only with MODIFICATIONS (journald's files)."""
    with DirWatch() as writes, DirWatch(MODIFICATIONS) as modifications:
        for w in (writes, modifications):
            w.add("default", tmp_path, is_sync_log_name)
            w.read()
        with open(tmp_path / "log", "a") as f:
            assert writes.read() == {"default"} and writes.restructured == {"default"}  # created
            modifications.read()
            f.write("APPEND user.a\n")
            f.flush()
            assert writes.wait(0.3) == set()
            assert modifications.wait(2) == {"default"} and modifications.restructured == set()
        assert writes.wait(2) == {"default"} and writes.restructured == set()  # closed: appended


def test_restructured_names_renames_and_removals_only(tmp_path):
    with DirWatch() as w:
        w.add("default", tmp_path, is_sync_log_name)
        w.read()
        (tmp_path / "log").write_text("MAILBOX user.a\n")
        w.wait(2)
        with open(tmp_path / "log", "a") as f:
            f.write("MAILBOX user.b\n")
        assert w.wait(2) == {"default"} and w.restructured == set()
        os.rename(tmp_path / "log", tmp_path / "log-run")
        assert w.wait(2) == {"default"} and w.restructured == {"default"}
