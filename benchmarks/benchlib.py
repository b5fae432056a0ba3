"""What the benchmarks share (not part of the product, nor of the test bed)."""

from __future__ import annotations

from testbed import images, product
from testbed.scenario import LabSystem
from testbed.product import Wheelhouse


def install_product(lab: LabSystem, house: Wheelhouse, release: str) -> None:
    """cyrushelper in the lab's container the way users install it, from this checkout's wheel
    (testbed.product). The wheelhouse holds the dependencies' wheels for the host's Python; on
    another release's root (another Python) they come from that release's Debian packages (a venv
    with --system-site-packages: python3-jinja2, python3-sdnotify), cyrushelper from the wheel."""
    inside = product.copy_wheels(house, lab.workdir / "wheels")
    if images.container_root(release) is None:
        lab.helper = product.install(lab.c, inside)
        return
    venv = product.PRODUCT_VENV
    lab.c.run(product.SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", venv, timeout=120)
    lab.c.run(f"{venv}/bin/pip", "install", "-q", "--no-index", "--no-deps", str(inside / house.wheel.name),
              timeout=300, env={"PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    lab.helper = f"{venv}/bin/cyrushelper"


def add_entry(lab: LabSystem, section: str, name: str, command: str, which: str = "primary") -> None:
    """Add an entry to a section of the lab pair's cyrus.conf (before the units are generated)."""
    conf = lab.pair.cyrus_conf(which)
    text = conf.read_text()
    header = f"{section} {{\n"
    if header not in text:
        text += f"{header}}}\n"
    conf.write_text(text.replace(header, f'{header}  {name:<13} cmd="{command}"\n', 1))
