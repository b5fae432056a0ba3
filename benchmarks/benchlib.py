"""What the benchmarks share (not part of the product, nor of the test bed)."""

from __future__ import annotations

from pathlib import Path

from testbed import images
from testbed.container import repository_root
from testbed.scenario import LabSystem


def helper_command(workdir: Path, release: str) -> str | None:
    """On another release's root the development venv's interpreter does not run: the checkout
    with that release's python3 (which has jinja2 and sdnotify from its packages)."""
    if images.container_root(release) is None:
        return None
    wrapper = workdir / "cyrushelper"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={repository_root()} exec /usr/bin/python3 -m cyrushelper "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def add_entry(lab: LabSystem, section: str, name: str, command: str, which: str = "primary") -> None:
    """Add an entry to a section of the lab pair's cyrus.conf (before the units are generated)."""
    conf = lab.pair.cyrus_conf(which)
    text = conf.read_text()
    header = f"{section} {{\n"
    if header not in text:
        text += f"{header}}}\n"
    conf.write_text(text.replace(header, f'{header}  {name:<13} cmd="{command}"\n', 1))
