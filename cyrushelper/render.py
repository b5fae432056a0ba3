"""`cyrushelper generate`: render the systemd units of one instance from templates/ into a directory.

The output is meant to be copied as-is into /etc/systemd/system:

    cyrus@.service                             shared by every instance (identical in every output)
    cyrus.service                              umbrella: `systemctl stop cyrus` stops every instance
    cyrus@NAME.service.d/cyrushelper.conf      this instance: config paths, writable paths, ordering
    cyrus.service.wants/cyrus@NAME.service     symlink: `systemctl start cyrus` starts this instance

With `--listeners systemd` (socket mode, listeners.py has the mapping) the drop-in also wires the
instance to its parts, rendered beside it: cyrus-NAME-start.service, one cyrus-NAME-SERVICE.socket
and cyrus-NAME-SERVICE@.service (worker template) per SERVICES address, cyrus-NAME-DAEMON.service
per DAEMON entry, cyrus-NAME-event-EVENT.timer/.service per EVENTS entry.

Every regular file carries a header with the SHA-256 of its body. Re-rendering overwrites a file only
while its body still matches that hash; a file edited by hand (or not written by us) is refused
unless --force. All or nothing: everything is rendered and checked in memory first (configuration,
paths systemd would ignore, the templates, what already stands in the output), then the files are
staged and swapped into place together (atomic.install_all), so a configuration error, a refusal,
a full disk or a read-only directory leaves the previous output exactly as it was.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

import jinja2

from cyrushelper import arguments, atomic, channels, exitcodes, listeners, role, state
from cyrushelper.atomic import InstallError, install_all
from cyrushelper.channels import hostless_channels, hostless_message
from cyrushelper.config import DEFAULT_IMAPD_CONF, ConfigError, Instance

log = logging.getLogger("cyrushelper.render")

HASH_TAG = "# cyrushelper-sha256: "
# The templates are installed as the package cyrushelper.templates (mapped from the source tree's
# top-level templates/, see setup.cfg), so wheels, editable installs and distribution packages all
# find them the same way.
TEMPLATE_PACKAGE = "cyrushelper.templates"
TEMPLATES = ("cyrus@.service.j2", "cyrus.service.j2", "cyrushelper.conf.j2",
             # socket mode (--listeners systemd), and the sandbox its Cyrus processes share
             "socket-start.service.j2", "socket-listener.socket.j2", "socket-worker@.service.j2",
             "socket-daemon.service.j2", "socket-event.service.j2", "socket-event.timer.j2", "_cyrus-process.j2")

# Instance names end up in unit names and file names: keep them to what needs no escaping.
_INSTANCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Paths end up in Environment=, ReadWritePaths= and ExecStartPre= lines: refuse anything systemd
# would split, unquote or expand (whitespace, quotes, backslash, '%' specifiers, '$' variables).
_SAFE_PATH_RE = re.compile(r"/[A-Za-z0-9_.+,:=@/-]*")
# systemd ignores (with a warning only) a path whose component is longer than NAME_MAX or that is
# PATH_MAX long or longer (systemd-analyze verify on 252: "ReadWritePaths= path has invalid
# length", "Failed to resolve unit specifiers"): the unit would run without it.
_NAME_MAX = 255
_PATH_MAX = 4095
# A writable path here would make ProtectSystem=strict meaningless: ReadWritePaths=/ (or /usr,
# /etc …) opens the whole system, or all of its programs or configuration, to the service.
_SYSTEM_DIRS = tuple(PurePosixPath(p) for p in ("/", "/bin", "/boot", "/dev", "/efi", "/etc", "/lib",
                                                "/lib32", "/lib64", "/libx32", "/proc", "/run",
                                                "/sbin", "/sys", "/usr", "/var"))
_VOLATILE_ROOTS = (PurePosixPath("/run"),)
_HOME_ROOTS = (PurePosixPath("/home"), PurePosixPath("/root"), PurePosixPath("/run/user"))
_PRIVATE_TMP_ROOTS = (PurePosixPath("/tmp"), PurePosixPath("/var/tmp"))


@dataclass(frozen=True)
class RenderedFile:
    relpath: str
    text: str | None = None         # a regular file ...
    link_target: str | None = None  # ... or a symlink
    mode: int = 0o644


@dataclass(frozen=True)
class WritablePath:
    path: PurePosixPath
    required: bool  # without '-': a missing path fails the start (only configdirectory)


# --------------------------------------------------------------------------- rendering

def running_helper() -> str | None:
    """How the units should call the cyrushelper that is running now, or None if it is not run as
    a program: its console script by absolute path (`V/bin/cyrushelper`, also when V/bin is not on
    PATH), or `PYTHON -m cyrushelper`. Paths are made absolute, not resolved: a venv's python is a
    symlink to the base interpreter and only the venv's own path runs the venv."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name == "cyrushelper.__main__":
        return f"{os.path.abspath(sys.executable)} -m cyrushelper"
    script = getattr(main, "__file__", None)
    entry = getattr(main, "main", None)   # a console script: `from cyrushelper.cli import main`
    if script and spec is None and getattr(entry, "__module__", None) == "cyrushelper.cli" \
            and getattr(entry, "__name__", None) == "main":
        return os.path.abspath(script)
    return None


def default_helper() -> str:
    found = running_helper()
    if found is None:
        raise ConfigError("--helper", None, "cannot tell which cyrushelper program is running (not the "
                                            "cyrushelper command nor `python -m cyrushelper`): give --helper PATH")
    return found


def load_templates(override: str | None = None) -> dict[str, tuple[str, str]]:
    """name -> (text, file it was read from) of every template: from --templates DIR, else the
    installed package data."""
    try:
        source = Path(override) if override else resources.files(TEMPLATE_PACKAGE)
    except ModuleNotFoundError:   # e.g. `python -m cyrushelper` in a checkout shadowing the install
        raise ConfigError(f"package {TEMPLATE_PACKAGE}", None, "not installed: install cyrushelper "
                          "(pip install .) and run it from outside the source tree, or give --templates DIR") from None
    texts = {}
    for name in TEMPLATES:
        try:
            texts[name] = (source.joinpath(name).read_text(encoding="utf-8"), str(source.joinpath(name)))
        except (OSError, UnicodeDecodeError) as e:
            where = override or f"package {TEMPLATE_PACKAGE}"
            raise ConfigError(where, None, f"template {name} cannot be read ({e})") from None
    return texts


def _environment(templates: dict[str, tuple[str, str]]) -> jinja2.Environment:
    def source(name: str):   # errors then carry the template's file name
        return (*templates[name], lambda: True) if name in templates else None
    return jinja2.Environment(loader=jinja2.FunctionLoader(source),
                              undefined=jinja2.StrictUndefined, trim_blocks=True,
                              lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)


def header(source: str, body: str) -> str:
    digest = hashlib.sha256(body.encode("utf-8")).hexdigest()
    return (f"# Generated by `cyrushelper generate` from templates/{source}: change the template or\n"
            f"# the Cyrus configuration and generate again. A hand-edited copy is never overwritten\n"
            f"# silently (generate refuses it without --force).\n"
            f"{HASH_TAG}{digest}\n")


def split_header(text: str) -> tuple[str | None, str]:
    """(recorded hash or None, body) of a file we may have written."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines[:10]):
        if line.startswith(HASH_TAG):
            return line[len(HASH_TAG):].strip(), "".join(lines[i + 1:])
        if not line.startswith("#"):
            break
    return None, text


def check_instance_name(name: str, option: str = "--instance") -> str:
    if not _INSTANCE_RE.fullmatch(name):
        raise ConfigError(option, None, f"instance name {name!r} must be 1-64 of A-Z a-z 0-9 _ . - "
                                        "(starting with a letter or digit)")
    return name


def _safe_path(path: str | os.PathLike, where: tuple[str, int | None]) -> PurePosixPath:
    text = os.fspath(path)
    if not os.path.isabs(text):
        raise ConfigError(where[0], where[1], f"path {text!r} must be absolute (the unit runs in /)")
    text = os.path.normpath(text)
    if text == "/var/run" or text.startswith("/var/run/"):
        text = "/run" + text[len("/var/run"):]  # /var/run is a symlink to /run
    if not _SAFE_PATH_RE.fullmatch(text):
        raise ConfigError(where[0], where[1], f"path {text!r} contains characters systemd unit files "
                                              "would interpret (whitespace, quotes, \\, %, $)")
    long_part = max(text.split("/"), key=len)
    if len(long_part.encode()) > _NAME_MAX:
        raise ConfigError(where[0], where[1], f"path component {long_part[:40]!r}… is "
                                              f"{len(long_part.encode())} bytes long: systemd ignores "
                                              f"paths with a component over {_NAME_MAX} bytes")
    if len(text.encode()) > _PATH_MAX:
        raise ConfigError(where[0], where[1], f"path {text[:40]!r}… is {len(text.encode())} bytes long: "
                                              f"systemd ignores paths over {_PATH_MAX} bytes")
    return PurePosixPath(text)


def _under(path: PurePosixPath, roots: tuple[PurePosixPath, ...]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def writable_paths(inst: Instance) -> list[WritablePath]:
    """What the instance writes to: imapd.conf's paths plus cyrus.conf's UNIX socket directories."""
    # configdirectory is the one required path (imapd.conf's list starts with it)
    found: list[tuple[PurePosixPath, bool]] = [(_writable(item.path, item.where, item.option),
                                                item.option == "configdirectory")
                                               for item in inst.imapd.writable_paths]
    for entry in [e for conf in (inst.cyrus_by_role.values() or [inst.cyrus]) for e in conf.entries]:
        listen = entry.listen
        if listen is not None and listen.kind == "unix":
            found.append((_writable(listen.path.parent, (entry.path, entry.line), f"{entry.name} listen="),
                          False))
    # Drop duplicates and paths inside another listed path (already writable through it).
    result: list[WritablePath] = []
    for path, required in found:
        if any(other in path.parents for other, _ in found):
            continue
        required = required or any(r for other, r in found if other == path)
        if all(w.path != path for w in result):
            result.append(WritablePath(path, required))
    return result


def _interpreter(path: PurePosixPath) -> PurePosixPath | None:
    """The program a script's #! line names (None for a binary, or a file we cannot read)."""
    try:
        with open(path, "rb") as f:
            first = f.readline(256)
    except OSError:
        return None
    words = first[2:].decode(errors="replace").split() if first.startswith(b"#!") else []
    return PurePosixPath(words[0]) if words and words[0].startswith("/") else None


def helper_command(helper: str | None, home_writable: bool = False) -> str:
    """The command the Exec*= lines run: --helper (one absolute path), else the running cyrushelper.
    Refused when the unit's sandbox would hide it (PrivateTmp= hides /tmp, ProtectHome= /home and
    /root): such a unit fails at its first start with status=203/EXEC."""
    words = (helper if helper is not None else default_helper()).split(" ")
    if helper is not None and len(words) > 1:
        raise ConfigError("--helper", None, f"{helper!r}: expected one absolute path")
    program = _safe_path(words[0], ("--helper", None))
    hidden_roots = _PRIVATE_TMP_ROOTS + (() if home_writable else _HOME_ROOTS)
    for candidate in (program, PurePosixPath(os.path.realpath(program)), _interpreter(program)):
        if candidate is not None and _under(candidate, hidden_roots):
            raise ConfigError("--helper", None,
                              f"{words[0]} runs from {candidate}, which the unit's sandbox hides "
                              "(PrivateTmp=, ProtectHome=): install cyrushelper elsewhere, e.g. "
                              "`python3 -m venv /opt/cyrushelper`, or give --helper PATH")
    return " ".join([str(program), *words[1:]])


def worker_command(helper_cmd: str) -> str:
    """How socket mode's worker units start the fd wrapper: `PYTHON -I -m cyrushelper.worker` when
    the helper is `PYTHON -m cyrushelper` or a Python script (its #! names the interpreter), which
    skips the CLI's imports at every worker start (15 ms instead of 41, worker.py); else
    `HELPER worker`."""
    words = helper_cmd.split(" ")
    if words[1:] == ["-m", "cyrushelper"]:
        interpreter = PurePosixPath(words[0])
    elif len(words) == 1:
        interpreter = _interpreter(PurePosixPath(words[0]))
    else:
        interpreter = None
    if interpreter is not None and interpreter.name.startswith("python") and _SAFE_PATH_RE.fullmatch(str(interpreter)):
        return f"{interpreter} -I -m cyrushelper.worker"
    return f"{helper_cmd} worker"


def _writable(path: str | os.PathLike, where: tuple[str, int | None], option: str | None) -> PurePosixPath:
    """A path for ReadWritePaths=: safe for a unit file, and not a whole system directory."""
    checked = _safe_path(path, where)
    if checked in _SYSTEM_DIRS:
        what = f"{option} is {str(checked)!r}" if option else f"a path derived from configdirectory is {str(checked)!r}"
        raise ConfigError(where[0], where[1], f"{what}: the unit would get ReadWritePaths={checked}, which "
                                              "undoes ProtectSystem=strict for that whole tree; use a "
                                              "directory of its own (Debian: /var/lib/cyrus)")
    return checked


def runtime_dirs(paths: list[WritablePath]) -> list[str]:
    """Writable paths on /run (tmpfs): they must be created at every start. /run itself is not."""
    return [str(w.path) for w in paths
            if _under(w.path, _VOLATILE_ROOTS) and w.path not in _VOLATILE_ROOTS
            and not _under(w.path, (PurePosixPath("/run/user"),))]


def uses_saslauthd(inst: Instance) -> bool:
    """Whether any sasl_pwcheck_method (plain or per service, `imap_sasl_pwcheck_method`) names
    saslauthd: only then is the instance ordered after saslauthd.service (ordering after a unit
    that is not needed made systemd 257's `verify` lint Debian 13's own saslauthd.service)."""
    return any(key.endswith("sasl_pwcheck_method") and "saslauthd" in opt.value.split()
               for key, opt in inst.imapd.options.items())


def render(inst: Instance, helper: str | None = None, *, replica_instance: str | None = None,
           unit_imapd_conf: str | None = None, unit_cyrus_conf: str | None = None,
           templates: dict[str, tuple[str, str]] | None = None, initial_role: str | None = None,
           socket_plan: listeners.Plan | None = None) -> list[RenderedFile]:
    """Every file of the output, in memory. Raises ConfigError before anything is written.
    `helper`: the --helper path (None: the running cyrushelper). `socket_plan`: socket mode's
    parts (listeners.plan()); None renders master mode."""
    name = check_instance_name(inst.name)
    if replica_instance is not None:
        check_instance_name(replica_instance, "--replica-instance")
        if replica_instance == name:
            raise ConfigError("--replica-instance", None, "an instance cannot be its own replica")
    imapd_conf = _safe_path(unit_imapd_conf or os.path.abspath(inst.imapd.path), ("--imapd-conf", None))
    primary_cyrus = inst.cyrus_by_role.get("primary", inst.cyrus)
    cyrus_conf = _safe_path(unit_cyrus_conf or os.path.abspath(primary_cyrus.path), ("--cyrus-conf", None))
    replica_cyrus_conf = None
    if inst.switchable and socket_plan is not None:
        raise ConfigError("--replica-cyrus-conf", None, "a switchable instance runs Cyrus master (its role "
                                                        "chooses master's cyrus.conf): not with --listeners systemd")
    if inst.switchable:
        role.check_switchable(inst)
        if initial_role not in role.ROLES:
            raise ConfigError("--initial-role", None, "a switchable instance (--replica-cyrus-conf) needs "
                                                      "--initial-role primary|replica")
        replica_cyrus_conf = _safe_path(os.path.abspath(inst.cyrus_by_role["replica"].path),
                                        ("--replica-cyrus-conf", None))
    paths = writable_paths(inst)
    volatile = runtime_dirs(paths)
    for channel, (path, line) in hostless_channels(inst):
        key = f"{channel.name}_sync_host" if channel.name else "sync_host"
        text = hostless_message(channel, (path, line)).split(": ", 1)[1]
        raise ConfigError(path, line, f"{text}; set {key}, or remove the channel")
    cyrus_user = inst.imapd.get("cyrus_user", "cyrus")
    cyrus_group = inst.imapd.get("cyrus_group")
    for value, key in ((cyrus_user, "cyrus_user"), (cyrus_group, "cyrus_group")):
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*\$?", value):
            raise ConfigError(*inst.imapd.where(key), f"{key} {value!r} is not a valid user/group name")
    packaged = str(imapd_conf) == str(DEFAULT_IMAPD_CONF) or (
        unit_imapd_conf is None and os.path.realpath(inst.imapd.path) == os.path.realpath(DEFAULT_IMAPD_CONF))
    home_writable = inst.imapd.get_bool("sieveusehomedir") or any(_under(w.path, _HOME_ROOTS) for w in paths)
    helper_cmd = helper_command(helper, home_writable)
    templates = templates if templates is not None else load_templates()
    env = _environment(templates)
    context = {
        "helper": helper_cmd,
        "worker_command": worker_command(helper_cmd),
        "instance": name,
        "imapd_conf": str(imapd_conf),
        "cyrus_conf": str(cyrus_conf),
        "replica_cyrus_conf": str(replica_cyrus_conf) if replica_cyrus_conf else None,
        "initial_role": initial_role,
        "replica_instance": replica_instance,
        "conflicts_packaged": packaged,
        "writable_paths": [(str(w.path), w.required) for w in paths],
        "runtime_dirs": volatile,
        "cyrus_user": cyrus_user,
        "cyrus_group": cyrus_group,
        "cyrus_owner": f"{cyrus_user}:{cyrus_group or ''}",
        "home_writable": home_writable,
        "uses_saslauthd": uses_saslauthd(inst),
        "plan": socket_plan,
        "fence_file": str(_safe_path(inst.fence_file, inst.imapd.where("configdirectory"))),
        "workers_dir": str(_safe_path(state.workers_dir(inst.imapd.configdirectory),
                                      inst.imapd.where("configdirectory"))),
    }

    def file(relpath: str, template: str, **extra) -> RenderedFile:
        try:
            body = env.get_template(template).render(context, **extra)
        except jinja2.TemplateError as e:
            raise _template_error(templates, template, e) from None
        return RenderedFile(relpath, text=header(template, body) + body)

    files = [
        file("cyrus@.service", "cyrus@.service.j2"),
        file("cyrus.service", "cyrus.service.j2"),
        file(f"cyrus@{name}.service.d/cyrushelper.conf", "cyrushelper.conf.j2"),
        RenderedFile(f"cyrus.service.wants/cyrus@{name}.service", link_target="../cyrus@.service"),
    ]
    if socket_plan is not None:
        files += _socket_mode_files(socket_plan, file, inst)
    return files


def _socket_mode_files(plan: listeners.Plan, file, inst: Instance) -> list[RenderedFile]:
    for argv in [a for _, a in plan.start] + [p.argv for p in plan.pools] + \
            [d.argv for d in plan.daemons] + [e.argv for e in plan.events]:
        for word in argv:  # the words go into Exec*= lines as they are
            if not re.fullmatch(r"[A-Za-z0-9_.+,:=@/-]+", word):
                raise ConfigError(inst.cyrus.path, None, f"command word {word!r} holds characters "
                                                         "systemd unit files would interpret")
    files = [file(plan.start_unit, "socket-start.service.j2")]
    for pool in plan.pools:
        files.append(file(pool.socket_unit, "socket-listener.socket.j2", pool=pool))
        files.append(file(pool.worker_template, "socket-worker@.service.j2", pool=pool))
    for daemon in plan.daemons:
        files.append(file(daemon.unit, "socket-daemon.service.j2", daemon=daemon))
    for event in plan.events:
        files.append(file(event.unit, "socket-event.service.j2", event=event))
        files.append(file(event.timer, "socket-event.timer.j2", event=event))
    return files


def _template_error(templates: dict[str, tuple[str, str]], template: str, e: jinja2.TemplateError) -> ConfigError:
    """A broken template as file:line (syntax errors carry both; an undefined variable only its
    template, which is the one being rendered unless an include names another)."""
    name = getattr(e, "name", None) or template
    if isinstance(e, jinja2.TemplateNotFound):
        return ConfigError(name, None, "template missing")
    return ConfigError(getattr(e, "filename", None) or templates.get(name, templates[template])[1],
                       getattr(e, "lineno", None),
                       f"template error: {e.message or type(e).__name__}")


# --------------------------------------------------------------------------- writing

class OutputConflict(Exception):
    """An existing output file we must not overwrite (edited by hand, or not ours)."""


def _existing_state(target: Path, item: RenderedFile) -> str:
    """'missing', 'same' (nothing to do), 'ours' (safe to replace) or a conflict reason."""
    if not os.path.lexists(target):
        return "missing"
    if item.link_target is not None:
        if target.is_symlink():
            return "same" if os.readlink(target) == item.link_target else \
                f"is a symlink to {os.readlink(target)!r}, not {item.link_target!r}"
        return "exists and is not a symlink"
    if target.is_symlink() or not target.is_file():
        return "exists and is not a regular file"
    try:
        current = target.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return f"cannot be read ({e})"
    if current == item.text:
        return "same"
    recorded, body = split_header(current)
    if recorded is None:
        return "was not generated by cyrushelper (no checksum header)"
    if hashlib.sha256(body.encode("utf-8")).hexdigest() != recorded:
        return "was edited by hand since it was generated (its body no longer matches its checksum)"
    return "ours"


def _blocking_parent(output: Path, item: RenderedFile) -> Path | None:
    """A path between `output` and the item that exists but is not a directory."""
    for parent in reversed(PurePosixPath(item.relpath).parents[:-1]):
        path = output / parent
        if os.path.lexists(path) and not os.path.isdir(path):
            return path
    return None


def plan(files: list[RenderedFile], output: Path, force: bool = False) -> list[RenderedFile]:
    """The files that need writing; raises OutputConflict naming every refused file."""
    todo, conflicts = [], []
    for item in files:
        blocking = _blocking_parent(output, item)
        if blocking is not None:
            if not force:
                conflicts.append(f"{blocking}: exists and is not a directory (needed for {item.relpath})")
            todo.append(item)
            continue
        state = _existing_state(output / item.relpath, item)
        if state == "same":
            continue
        if state not in ("missing", "ours") and not force:
            conflicts.append(f"{output / item.relpath}: {state}")
            continue
        todo.append(item)
    if conflicts:
        raise OutputConflict("refusing to overwrite (nothing written; use --force to replace):\n  "
                             + "\n  ".join(conflicts))
    return todo


def check_output(output: Path) -> None:
    """Refuse an --output that can never work, before rendering anything."""
    if os.path.islink(output) and not output.exists():
        raise ConfigError("--output", None, f"{output} is a symlink to {os.readlink(output)!r}, which does "
                                            "not exist")
    if output.exists() and not output.is_dir():
        raise ConfigError("--output", None, f"{output} exists and is not a directory")


def generate(inst: Instance, output: Path, helper: str | None = None, *, force: bool = False,
             **render_options) -> list[RenderedFile]:
    """Render, check, then write all files or none. Raises ConfigError, OutputConflict or
    atomic.InstallError (nothing changed unless its undo failed, which it says)."""
    check_output(output)
    files = render(inst, helper, **render_options)
    todo = plan(files, output, force)
    if todo:
        install_all(output, todo)
    return todo


# --------------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    arguments.add_instance_arguments(parser)
    parser.add_argument("--output", "-o", required=True, metavar="DIR", type=arguments.nonempty,
                        help="directory to write the units into (copy its contents to /etc/systemd/system)")
    parser.add_argument("--helper", metavar="PATH",
                        help="absolute path the units call cyrushelper by (default: this cyrushelper "
                             "as it was run: its absolute path, or PYTHON -m cyrushelper)")
    parser.add_argument("--replica-instance", metavar="NAME",
                        help="a local instance replicating from this one: it is stopped only after "
                             "this instance stopped and drained")
    parser.add_argument("--unit-imapd-conf", metavar="PATH",
                        help="imapd.conf path written into the unit, when the parsed file is a copy "
                             "(default: --imapd-conf, made absolute)")
    parser.add_argument("--unit-cyrus-conf", metavar="PATH",
                        help="cyrus.conf path written into the unit (default: --cyrus-conf, made absolute)")
    parser.add_argument("--listeners", choices=listeners.MODES, default="master",
                        help="who holds the listening sockets: master = Cyrus master binds them (default); "
                             "systemd = socket mode, systemd holds them and runs each service as a pool "
                             "of worker units, so a restart refuses no connection")
    parser.add_argument("--workers", action="append", metavar="SERVICE=N",
                        help="socket mode: N workers for the SERVICES entry SERVICE (repeatable; default "
                             "maxchild, else max(prefork, %d))" % listeners.DEFAULT_POOL)
    parser.add_argument("--templates", metavar="DIR", help="template directory (default: the templates installed with cyrushelper)")
    parser.add_argument("--force", action="store_true",
                        help="replace output files even if they were edited by hand")


def main(args: argparse.Namespace) -> int:
    check_instance_name(args.instance)
    output = Path(args.output)
    check_output(output)
    inst = arguments.load_instance(args)
    socket_plan = None
    if args.listeners == "systemd":
        try:
            workers = listeners.parse_workers(args.workers)
        except ValueError as e:
            raise ConfigError("--workers", None, str(e)) from None
        socket_plan = listeners.plan(inst, workers)
        for note in socket_plan.notes:
            log.warning("%s", note)
    elif args.workers:
        raise ConfigError("--workers", None, "--workers sizes socket mode's pools: add --listeners systemd")
    try:
        written = generate(inst, output, args.helper, force=args.force,
                           replica_instance=args.replica_instance,
                           unit_imapd_conf=args.unit_imapd_conf, unit_cyrus_conf=args.unit_cyrus_conf,
                           templates=load_templates(args.templates), initial_role=args.initial_role or None,
                           socket_plan=socket_plan)
    except OutputConflict as e:
        print(f"cyrushelper generate: {e}", file=sys.stderr)
        return exitcodes.FAILURE
    except InstallError as e:
        where = f": {e.filename}" if e.filename and atomic.STAGING_PREFIX not in str(e.filename) else ""
        if e.rolled_back:
            outcome = "nothing written, the previous output is intact"
        else:
            outcome = "UNDO FAILED, check the output: " + "; ".join(e.undo_failures)
        print(f"cyrushelper generate: cannot write into {output}: {e.strerror}{where}; {outcome}",
              file=sys.stderr)
        return exitcodes.IO_ERROR
    # with --unit-imapd-conf the parsed file is a copy: its -C warnings would be meaningless
    if args.unit_imapd_conf is None:
        for warning in inst.warnings + channels.warnings(inst):
            log.warning("%s", warning)
    for item in written:
        print(output / item.relpath)
    if not written:
        print(f"{output}: up to date")
    return exitcodes.OK
