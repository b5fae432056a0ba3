"""What the benchmarks share (not part of the product, nor of the test bed)."""

from __future__ import annotations

from testbed.scenario import LabSystem


def add_entry(lab: LabSystem, section: str, name: str, command: str, which: str = "primary") -> None:
    """Add an entry to a section of the lab pair's cyrus.conf (before the units are generated)."""
    conf = lab.pair.cyrus_conf(which)
    text = conf.read_text()
    header = f"{section} {{\n"
    if header not in text:
        text += f"{header}}}\n"
    conf.write_text(text.replace(header, f'{header}  {name:<13} cmd="{command}"\n', 1))
