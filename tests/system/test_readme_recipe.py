"""The README's switchable-pair recipe, word for word, in a throwaway systemd with real Cyrus: its
shell blocks run in one shell as root, `cyrushelper` found on PATH -- the wheel of this checkout
installed the README's way into /opt/cyrushelper (testbed/product.py), so the units it generates
run unchanged, sandbox and all. The container's root is an overlay, so /srv/cyrus and
/root/units-* exist only inside it."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from testbed import product
from testbed.container import SystemdContainer
from testbed.scenario import new_workdir
from tests.conftest import require_container_host, require_root_and_cyrus
from tests.unit.test_docs import recipe_blocks

pytestmark = pytest.mark.system


def test_readme_recipe_sets_up_a_pair_that_switches(request, wheelhouse):
    require_root_and_cyrus()
    require_container_host()
    workdir = new_workdir("readme-recipe")
    try:
        with SystemdContainer(workdir) as box:
            helper = product.install(box, product.copy_wheels(wheelhouse, workdir / "wheels"))
            script = "\n".join(recipe_blocks())
            r = box.run("sh", "-ec", script, timeout=600,
                        env={"PATH": f"{os.path.dirname(helper)}:/usr/sbin:/usr/bin:/sbin:/bin"})
            print(r.stdout)
            print(r.stderr[-3000:])
            assert r.returncode == 0, r.stderr[-3000:]
            lines = r.stdout.splitlines()
            start = lines.index("{")
            status = json.loads("\n".join(lines[start:lines.index("}", start) + 1]))
            assert status["role"] == "primary" and status["instance"] == "a"
            assert "switchover" in r.stdout and ": done: b is primary, a its replica; new direction verified" in r.stdout
            after = box.run(helper, "status",
                            "--instance", "b", "--json", check=False)
            assert json.loads(after.stdout)["role"] == "primary"
            print(box.journal()[-6000:])
    finally:
        if not os.environ.get("CYRUSHELPER_KEEP_LAB"):
            shutil.rmtree(workdir, ignore_errors=True)
