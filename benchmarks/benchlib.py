"""What the benchmarks share (not part of the product, nor of the test bed)."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from typing import Callable, Iterator

from testbed.product import Wheelhouse, build_wheelhouse
from testbed.scenario import LabSystem, new_workdir


@contextmanager
def product_wheelhouse() -> Iterator[Wheelhouse]:
    """The product as users install it (this checkout's wheel and its dependencies' wheels, which
    LabSystem installs into a venv under /opt in each container); removed afterwards."""
    scratch = new_workdir("bench-wheel")
    try:
        yield build_wheelhouse(scratch / "build")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_trials(trials: int, trial: Callable[[Wheelhouse], dict], float_format: str) -> list[dict]:
    """`trials` runs of `trial` on the product as users install it, each printed as a line of
    key=value as it ends (floats with `float_format`, e.g. ".3g")."""
    runs = []
    with product_wheelhouse() as house:
        for i in range(trials):
            r = trial(house)
            runs.append(r)
            print(f"trial {i + 1}: " + " ".join(f"{k}={v:{float_format}}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in r.items()), flush=True)
    return runs


def add_entry(lab: LabSystem, section: str, name: str, command: str, which: str = "primary") -> None:
    """Add an entry to a section of the lab pair's cyrus.conf (before the units are generated)."""
    conf = lab.pair.cyrus_conf(which)
    text = conf.read_text()
    header = f"{section} {{\n"
    if header not in text:
        text += f"{header}}}\n"
    conf.write_text(text.replace(header, f'{header}  {name:<13} cmd="{command}"\n', 1))
