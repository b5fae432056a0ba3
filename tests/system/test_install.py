"""The README's install recipe, line for line, under a real systemd (PID 1 of a throwaway container)
with real Cyrus 3.6: `python3 -m venv /opt/cyrushelper && /opt/cyrushelper/bin/pip install .` in a
clean copy of the checkout (the venv never on PATH), `generate`, `cp -R`, `daemon-reload`, start,
deliver, `systemctl stop cyrus` -- with no bind mount, drop-in or symlink from the test.

The only thing the test adds is pip's offline source: the container has no network, so
PIP_NO_INDEX/PIP_FIND_LINKS point pip at the wheels the host fetched (testbed/product.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import pytest

from testbed.container import SystemdContainer
from testbed.product import PRODUCT_VENV, Wheelhouse, copy_wheels, modules_without_bytecode, source_tree
from testbed.scenario import LabSystem, new_workdir
from tests.conftest import require_container_host, require_root_and_cyrus

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
RECIPE_HEADING = "## Installing for your instances"
PRIMARY, REPLICA = "cyrus@primary.service", "cyrus@replica.service"


def readme_recipe() -> list[str]:
    """The command lines of the README's install recipe (its first indented block), comments cut."""
    text = (ROOT / "README.md").read_text().split(RECIPE_HEADING, 1)[1]
    block = re.search(r"\n\n((?: {4}\S.*\n)+)", text).group(1)
    return [line.strip().split("  #")[0].strip() for line in block.splitlines()]


def test_readme_recipe_is_what_these_tests_run():
    recipe = readme_recipe()
    assert recipe[:2] == [f"python3 -m venv {PRODUCT_VENV}", f"{PRODUCT_VENV}/bin/pip install ."]
    assert recipe[2].startswith(f"{PRODUCT_VENV}/bin/cyrushelper generate --imapd-conf /etc/imapd.conf "
                                "--cyrus-conf /etc/cyrus.conf --instance default --output ")
    assert recipe[3:] == [f"cp -R {output_dir(recipe)}/. /etc/systemd/system/", "systemctl daemon-reload",
                          "systemctl start cyrus@default", "systemctl enable cyrus", "systemctl stop cyrus"]


def output_dir(recipe: list[str]) -> str:
    return recipe[2].split("--output ", 1)[1].split()[0]


def test_wheel_build_is_silent_and_carries_the_templates(wheelhouse: Wheelhouse):
    assert wheelhouse.metadata_warnings() == [], "pip/setuptools warn about our metadata"
    names = zipfile.ZipFile(wheelhouse.wheel).namelist()
    for template in ("cyrus@.service.j2", "cyrus.service.j2", "cyrushelper.conf.j2"):
        assert f"cyrushelper/templates/{template}" in names


class Recipe:
    """A booted container, a clean copy of the checkout and the wheels inside its work directory."""

    def __init__(self, box: SystemdContainer, workdir: Path, house: Wheelhouse):
        self.box, self.workdir = box, workdir
        self.source = source_tree(workdir / "src")
        self.env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(copy_wheels(house, workdir / "wheels")),
                    "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        self.lines = readme_recipe()

    def run(self, line: str, timeout: float = 300, cwd: str | None = None):
        """One recipe line as root's shell runs it, from the checkout (for `pip install .`)."""
        r = self.box.run("sh", "-c", f"cd {cwd or self.source} && {line}", env=self.env, timeout=timeout,
                         check=False)
        assert r.returncode == 0, f"`{line}` failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        return r

    def install(self) -> str:
        for line in self.lines[:2]:
            self.run(line)
        return f"{PRODUCT_VENV}/bin/cyrushelper"


@pytest.fixture
def recipe(wheelhouse, request):
    require_root_and_cyrus()
    require_container_host()
    workdir = new_workdir(request.node.name[:30])
    box = SystemdContainer(workdir).__enter__()
    try:
        yield Recipe(box, workdir, wheelhouse)
        print(f"--- journal ---\n{box.journal()[-15000:]}")
    finally:
        box.__exit__(None, None, None)
        if not os.environ.get("CYRUSHELPER_KEEP_LAB"):
            shutil.rmtree(workdir, ignore_errors=True)


def _mail(box: SystemdContainer, code: str) -> dict:
    """Run test-bed mail code (testbed.mail) inside the container; it prints one JSON line."""
    r = box.run(box.python, "-c", "import json\nfrom testbed.mail import *\n" + code, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_readme_recipe_on_debians_untouched_configuration(recipe):
    box = recipe.box
    recipe.install()
    for line in recipe.lines[2:6]:     # generate, cp -R, daemon-reload, systemctl start cyrus@default
        recipe.run(line)
    unit = box.run("cat", "/etc/systemd/system/cyrus@.service").stdout
    assert f"\nExecStart={PRODUCT_VENV}/bin/cyrushelper run --instance %i " in unit
    assert modules_without_bytecode(box, f"{PRODUCT_VENV}/bin/python") == []  # pip compiled them
    assert box.run("ls", "/etc/systemd/system/cyrus@default.service.d").stdout.split() == ["cyrushelper.conf"]
    assert box.show("cyrus@default.service", "ActiveState")["ActiveState"] == "active"

    # Debian's configuration has no user and no replication: a SASL user (sasldb, as its
    # `sasl_pwcheck_method: auxprop` says), whose first login creates the INBOX (autocreate_quota: 0),
    # then mail through Debian's LMTP socket.
    box.run("saslpasswd2", "-c", "-p", "alice", input="alicepass\n")
    record = recipe.workdir / "debian.record"
    got = _mail(box, f"""
print(json.dumps({{"before": sorted(message_ids(143, "alice", "alicepass", host="127.0.0.1")),
                   "acked": deliver_lmtp(0, "alice", 30, "debian", {str(record)!r}, host="/run/cyrus/socket/lmtp")}}))
""")
    assert got == {"before": [], "acked": 30}, got

    for line in recipe.lines[6:]:      # systemctl enable cyrus; systemctl stop cyrus
        recipe.run(line)
    props = box.show("cyrus@default.service", "ActiveState", "Result")
    assert props == {"ActiveState": "inactive", "Result": "success"}, box.journal("cyrus@default.service")[-3000:]

    box.systemctl("start", "cyrus@default.service", timeout=120)
    wanted = sorted(line.split()[1] for line in record.read_text().splitlines())
    seen = _mail(box, 'print(json.dumps(sorted(message_ids(143, "alice", "alicepass", host="127.0.0.1"))))')
    assert seen == wanted, "messages acknowledged before the stop are missing after the start"

    # `python -m cyrushelper generate` renders the interpreter of the venv, not a bare name
    out = recipe.run(recipe.lines[2].replace(f"{PRODUCT_VENV}/bin/cyrushelper", f"{PRODUCT_VENV}/bin/python -m cyrushelper")
                     .replace(output_dir(recipe.lines), "/tmp/dash-m"), cwd="/")
    assert out.returncode == 0
    assert f"\nExecStart={PRODUCT_VENV}/bin/python -m cyrushelper run " in box.run("cat", "/tmp/dash-m/cyrus@.service").stdout


def test_readme_recipe_on_a_replicating_pair_loses_nothing(recipe, wheelhouse):
    box = recipe.box
    lab = LabSystem(box, recipe.workdir, rolling=True).create()   # the pair only; the product comes next
    lab.helper = recipe.install()
    generate, copy = recipe.lines[2], recipe.lines[3]
    out = output_dir(recipe.lines)
    for which in ("replica", "primary"):
        own = (generate.replace("/etc/imapd.conf", str(lab.pair.imapd_conf(which)))
               .replace("/etc/cyrus.conf", str(lab.pair.cyrus_conf(which)))
               .replace("--instance default", f"--instance {which}").replace(out, f"{out}-{which}"))
        recipe.run(own + (" --replica-instance replica" if which == "primary" else ""))
        recipe.run(copy.replace(out, f"{out}-{which}"))
    recipe.run(recipe.lines[4])                                      # systemctl daemon-reload
    for which in ("replica", "primary"):
        recipe.run(recipe.lines[5].replace("cyrus@default", f"cyrus@{which}"))
    load, record = lab.start_load(seconds=300)
    assert lab.wait_acknowledged(record, 200, timeout=60) >= 200, "load did not get going"

    for line in recipe.lines[6:]:      # systemctl enable cyrus; systemctl stop cyrus
        recipe.run(line)
    lab.stop_load(load)

    for unit in (PRIMARY, REPLICA):
        assert box.show(unit, "ActiveState", "Result") == {"ActiveState": "inactive", "Result": "success"}, \
            box.journal(unit)[-3000:]
    assert lab.pending_files() == {"default": []}, "sync log not empty after `systemctl stop cyrus`"
    drain = lab.state_file("last-drain.json")
    assert drain["exit_code"] == 0 and drain["channels"][0]["lines_before"] > 0, drain
    lab.start(REPLICA)
    report = lab.verify(record)
    assert report["acknowledged"] >= 200 and report["missing"] == 0, report
    assert lab.unexpected_sigterm_lines() == []
    print(f"README recipe on the pair: {report['summary']}")
