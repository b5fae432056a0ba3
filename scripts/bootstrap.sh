#!/bin/sh
# Install what cyrushelper's demo and tests need on Debian 12 or 13, as root, idempotently:
# Cyrus from Debian (3.6 on 12, 3.10 on 13), systemd-nspawn pinned to the installed systemd (an unpinned install
# would upgrade systemd itself), libsystemd-dev for the systemd-python extra, and a venv in .venv.
set -eu
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bootstrap: run as root (installs Debian packages)" >&2; exit 1; }
SDV=$(dpkg-query -W -f='${Version}' systemd)
# Cyrus + SASL tools for the lab pair; pop3d/nntpd/httpd, which Debian's own cyrus.conf names (the
# install test runs it untouched, socket mode renders it); nspawn for the throwaway systemd; libsystemd-dev etc. to build
# systemd-python; debhelper..lintian build and check the Debian package, rpm..python3-installer the
# Fedora one (tests/system/test_packaging_{deb,rpm}.py); debootstrap builds the other Debian
# release's root for its containers (testbed/images.py); openssh-server gives the two-host
# switchover test its sshd (run inside a container only).
PKGS="cyrus-imapd cyrus-common cyrus-replication cyrus-admin cyrus-clients sasl2-bin
      cyrus-pop3d cyrus-nntpd cyrus-caldav
      systemd-container=$SDV libsystemd-dev=$SDV pkg-config gcc python3-venv python3-dev
      debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools python3-jinja2
      python3-pyinotify python3-sdnotify python3-packaging python3-pytest python3-hypothesis
      dpkg-dev fakeroot lintian rpm rpmlint python3-build python3-installer debootstrap openssh-server"
# systemd.pc (the package build asks it for the unit directory) is in systemd-dev since Debian 13
. /etc/os-release
[ "${VERSION_CODENAME:-}" = bookworm ] || PKGS="$PKGS systemd-dev=$SDV"
missing=""
for p in $PKGS; do
  name=${p%%=*}
  dpkg-query -W -f='${Status}' "$name" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "bootstrap: apt-get install$missing"
  # policy-rc.d: the cyrus-common postinst must not try to start a system-wide Cyrus here
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
# Debian's own interpreter by default: units run the helper under ProtectHome=yes, so a venv whose
# python lives in /root (pyenv) would be invisible to them. PYTHON=... picks another one.
PY=${PYTHON:-/usr/bin/python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[journal,test]'
# The test bed (testbed/: Cyrus pair, LMTP load, throwaway systemd, the demo) is not part of the
# product and not in the wheel or the packages: only this development venv imports it, from here.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$(pwd)" > "$site/cyrushelper-testbed.pth"
echo "bootstrap: ready ($(.venv/bin/python --version), $(/usr/lib/cyrus/bin/master -V 2>&1 | head -1 || echo cyrus))"
