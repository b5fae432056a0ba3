"""Property-based tests of the configuration parsers (hypothesis).

- Valid files, written in any of the layouts Cyrus accepts (comments, blank lines, indentation,
  continuation lines, CRLF), parse back to exactly the options/entries they were generated from.
- Arbitrary bytes never raise anything but ConfigError, and every reported line is inside the file.
- A known-bad line inserted anywhere is reported at exactly that line.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cyrushelper.config import ConfigError, Instance, parse_cyrus_conf, parse_imapd_conf

# 100 examples keep the fast loop fast; CYRUSHELPER_PROP_EXAMPLES=2000 for a deeper search.
SETTINGS = settings(max_examples=int(os.environ.get("CYRUSHELPER_PROP_EXAMPLES", "100")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


_TMP = tempfile.TemporaryDirectory(prefix="cyrushelper-props-")  # removed when the interpreter exits
_serial = itertools.count()


def write_temp(data: bytes | str, name: str = "x.conf") -> Path:
    directory = Path(_TMP.name) / str(next(_serial))
    directory.mkdir()
    path = directory / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogateescape"))
    return path


def line_count(path: Path) -> int:
    return len(path.read_bytes().split(b"\n"))


def outcome(parse, path: Path):
    """The parse result or the ConfigError; any other exception fails the test."""
    try:
        return parse(path)
    except ConfigError as e:
        assert e.path and str(e).startswith(e.path), str(e)
        assert "\n" not in str(e)
        if e.line is not None:
            assert 1 <= e.line <= line_count(Path(e.path)), (e.line, str(e))
        return e


# --------------------------------------------------------------------------- imapd.conf

# Option names that no validator looks at, so any value is fine for them.
option_names = st.from_regex(r"x[a-z0-9_-]{0,12}", fullmatch=True).filter(
    lambda k: not k.endswith("_db_path") and "partition-" not in k)  # those must hold absolute paths
# Values: printable, no leading/trailing blanks, no backslash at the end, no newline.
option_values = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF, exclude_characters="\\"),
                        min_size=1, max_size=20).flatmap(
    lambda v: st.sampled_from([v, v[:len(v) // 2] + " \t " + v[len(v) // 2:] if len(v) > 1 else v]))
blank_or_comment = st.sampled_from(["", "   ", "\t", "# comment", "   # indented", "#", "# trailing \\x"])
indent = st.sampled_from(["", " ", "\t", "  \t "])
after_colon = st.sampled_from(["", " ", "\t", "   "])
trailing = st.sampled_from(["", " ", "\t", " \r"])


@st.composite
def imapd_files(draw):
    options = draw(st.dictionaries(option_names, option_values, max_size=12))
    options = {"configdirectory": "/var/lib/" + draw(st.from_regex(r"[a-z]{1,8}", fullmatch=True)), **options}
    lines: list[str] = []
    expected_lines: dict[str, int] = {}
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    for key, value in options.items():
        for _ in range(draw(st.integers(0, 2))):
            lines.append(draw(blank_or_comment))
        key_text = "".join(c.upper() if draw(st.booleans()) else c for c in key)  # names ignore case
        text = f"{draw(indent)}{key_text}:{draw(after_colon)}{value}{draw(trailing)}"
        expected_lines[key] = len(lines) + 1
        # Split the logical line over physical lines with '\' anywhere (Cyrus joins them verbatim);
        # not in CRLF files, where the '\' is followed by '\r' and so is no continuation.
        cuts = [] if newline == "\r\n" else draw(st.lists(st.integers(1, max(1, len(text) - 1)), max_size=2))
        cuts = sorted(set(cuts))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        lines.extend(piece + "\\" for piece in pieces[:-1])
        lines.append(pieces[-1])
    ending = draw(st.sampled_from(["", newline]))
    return newline.join(lines) + ending, options, expected_lines


@SETTINGS
@given(imapd_files())
def test_valid_imapd_conf_round_trips(generated):
    text, options, expected_lines = generated
    conf = parse_imapd_conf(write_temp(text))
    assert {k: o.value for k, o in conf.options.items()} == {k.lower(): v for k, v in options.items()}
    assert {k: conf.where(k)[1] for k in options} == expected_lines


@SETTINGS
@given(st.binary(max_size=400))
def test_garbage_imapd_conf_only_raises_config_error(data):
    outcome(parse_imapd_conf, write_temp(data))


@SETTINGS
@given(st.lists(st.text(st.characters(codec="utf-8"), max_size=40), max_size=12))
def test_garbage_text_lines_imapd_conf(lines):
    outcome(parse_imapd_conf, write_temp("configdirectory: /var/lib/x\n" + "\n".join(lines)))


BAD_IMAPD_LINES = ["no colon here", "sync_log : 1", "name = value", "sync_host:", "@import: /x",
                   "sync_log: Yes", "weird!key: 1", "@include: relative.conf", "proc_path: relative"]


@SETTINGS
@given(imapd_files(), st.data())
def test_bad_imapd_line_is_reported_where_it_is(generated, data):
    text, _, _ = generated
    assume("\r" not in text)
    lines = text.split("\n")
    # Insert between logical lines only (not after a '\' line, which would join the bad line).
    slots = [i for i in range(len(lines) + 1) if i == 0 or not lines[i - 1].endswith("\\")]
    at = data.draw(st.sampled_from(slots))
    bad = data.draw(st.sampled_from(BAD_IMAPD_LINES))
    path = write_temp("\n".join(lines[:at] + [bad] + lines[at:]))
    e = outcome(parse_imapd_conf, path)
    assert isinstance(e, ConfigError), bad
    assert e.line == at + 1, (bad, str(e))


# --------------------------------------------------------------------------- cyrus.conf

entry_names = st.from_regex(r"[A-Za-z][A-Za-z0-9]{0,10}", fullmatch=True)
words = st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters='"#{}'),
                min_size=1, max_size=10)
arg_keys = st.from_regex(r"x[a-z0-9]{0,6}", fullmatch=True)
arg_values = st.one_of(words, st.lists(words, min_size=1, max_size=3).map(" ".join))
ports = st.one_of(st.integers(1, 65535).map(str), st.sampled_from(["imap", "pop3", "lmtp", "sieve"]))
listens = st.one_of(ports, st.tuples(st.sampled_from(["127.0.0.1", "localhost", "[::1]", "0.0.0.0"]), ports)
                    .map(":".join), st.from_regex(r"/run/[a-z]{1,10}/[a-z]{1,10}", fullmatch=True))


@st.composite
def cyrus_files(draw):
    lines: list[str] = []
    expected = []
    used_names: set[str] = set()
    for section in draw(st.lists(st.sampled_from(["START", "SERVICES", "EVENTS", "DAEMON"]), unique=True)):
        header = draw(st.sampled_from([section, section.capitalize()]))
        lines.append(f"{header}{draw(st.sampled_from([' ', '', '  ']))}{{{draw(st.sampled_from(['', ' # c']))}")
        for _ in range(draw(st.integers(0, 4))):
            name = draw(entry_names)
            if section in ("SERVICES", "DAEMON"):
                assume(name not in used_names)
                used_names.add(name)
            args = {"cmd": " ".join(draw(st.lists(words, min_size=1, max_size=4)))}
            if section == "SERVICES":
                args["listen"] = draw(listens)
            args.update(draw(st.dictionaries(arg_keys, arg_values, max_size=3)))
            rendered = []
            for key, value in args.items():
                quoted = " " in value or draw(st.booleans())
                rendered.append(f'{key}="{value}"' if quoted else f"{key}={value}")
            sep = draw(st.sampled_from([" ", "\t", "  "]))
            comment = draw(st.sampled_from(["", "  # note", "\t#"]))
            lead = draw(st.sampled_from(["  ", "\t", ""]))
            if draw(st.booleans()):
                lines.append(draw(st.sampled_from(["", "  # comment", "\t"])))
            lines.append(f"{lead}{name}{sep}{sep.join(rendered)}{comment}")
            expected.append((section, name, args, len(lines)))
        lines.append(draw(st.sampled_from(["}", "  }", "} # end"])))
        lines.append("")
    return "\n".join(lines), expected


@SETTINGS
@given(cyrus_files())
def test_valid_cyrus_conf_round_trips(generated):
    text, expected = generated
    conf = parse_cyrus_conf(write_temp(text))
    assert [(e.section, e.name, e.args, e.line) for e in conf.entries] == expected


@SETTINGS
@given(st.binary(max_size=400))
def test_garbage_cyrus_conf_only_raises_config_error(data):
    outcome(parse_cyrus_conf, write_temp(data))


@SETTINGS
@given(st.lists(st.text(st.sampled_from(list('SERVICES{}"=# \tabcdimap/:[]1')), max_size=30), max_size=12))
def test_garbage_cyrus_lines_only_raise_config_error(lines):
    outcome(parse_cyrus_conf, write_temp("\n".join(lines)))


BAD_CYRUS_LINES = ['  listen="imap" prefork=0', "  bad_name cmd=\"x\" listen=1", '  x cmd="a # b"',
                   '  x cmd="y" }', "  x cmd=y \\", '  x cmd="a {"', "  = x"]


@SETTINGS
@given(cyrus_files(), st.data())
def test_bad_cyrus_line_is_reported_where_it_is(generated, data):
    text, expected = generated
    assume(expected)
    at = data.draw(st.sampled_from([line for *_, line in expected]))  # just before an entry line
    lines = text.split("\n")
    bad = data.draw(st.sampled_from(BAD_CYRUS_LINES))
    path = write_temp("\n".join(lines[:at - 1] + [bad] + lines[at - 1:]))
    e = outcome(parse_cyrus_conf, path)
    assert isinstance(e, ConfigError), bad
    assert e.line == at, (bad, str(e))


@SETTINGS
@given(st.binary(max_size=200), st.binary(max_size=200))
def test_instance_load_only_raises_config_error(imapd_bytes, cyrus_bytes):
    imapd_path, cyrus_path = write_temp(imapd_bytes, "imapd.conf"), write_temp(cyrus_bytes, "cyrus.conf")
    try:
        inst = Instance.load(imapd_path, cyrus_path)
    except ConfigError:
        return
    inst.summary()
