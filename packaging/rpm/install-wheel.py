"""%pyproject_install's substitute (packaging/rpm/macros.substitutes): install the wheels of DIR into
DESTDIR with the posix_prefix scheme under /usr -- Fedora's /usr/lib/python3.X/site-packages and
/usr/bin. Debian's own installer and pip default to its posix_local scheme (/usr/local)."""

import glob
import sys
import sysconfig

from installer import install
from installer.destinations import SchemeDictionaryDestination
from installer.sources import WheelFile

wheel_dir, destdir = sys.argv[1], sys.argv[2]
scheme = sysconfig.get_paths("posix_prefix", vars={"base": "/usr", "platbase": "/usr"})
destination = SchemeDictionaryDestination(scheme, interpreter=sys.executable, script_kind="posix",
                                          destdir=destdir)
for wheel in sorted(glob.glob(f"{wheel_dir}/*.whl")):
    with WheelFile.open(wheel) as source:
        install(source, destination, {"INSTALLER": b"rpm"})
