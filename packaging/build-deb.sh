#!/bin/sh
# Build the Debian package from this checkout in a scratch copy, then lintian it.
#   sh packaging/build-deb.sh [OUTDIR]      (default OUTDIR: ./dist)
# Needs: apt-get install devscripts debhelper dh-python pybuild-plugin-pyproject python3-all \
#        python3-setuptools python3-jinja2 python3-pyinotify python3-sdnotify python3-pytest \
#        python3-hypothesis lintian
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$repo/dist}" && cd "${1:-$repo/dist}" && pwd)
work=$(mktemp -d /tmp/cyrushelper-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
src="$work/cyrushelper"
mkdir "$src"
# What a commit of this tree would hold: the files git tracks (minus ones deleted in the work
# tree) plus new files that are not ignored -- never .venv/, build output or caches. A tree that is
# not a git checkout (an unpacked release, the tests' clean copy) is taken as it is.
if command -v git >/dev/null && git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$repo" && git ls-files --cached --others --exclude-standard |
        while IFS= read -r f; do if [ -e "$f" ] || [ -L "$f" ]; then echo "$f"; fi; done |
        tar -cf - --no-recursion -T -) | tar -xf - -C "$src"
else
    (cd "$repo" && tar -cf - --exclude=./dist .) | tar -xf - -C "$src"
fi
rm -rf "$src/debian"
cp -r "$src/packaging/debian" "$src/debian"
# Debian's own interpreters only: a pyenv/venv python3.11 earlier in PATH would be picked by pybuild.
(cd "$src" && PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b)
cp "$work"/*.deb "$work"/*.buildinfo "$work"/*.changes "$out"/
echo "built: $(ls "$out"/cyrushelper_*.deb)"
if command -v lintian >/dev/null; then
    echo "lintian --pedantic: $(lintian --version)"   # says that it ran, also when it finds nothing
    lintian --info --display-info --pedantic "$work"/*.changes || true
fi
