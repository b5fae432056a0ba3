#!/bin/sh
# Build the Fedora package from this checkout with rpmbuild -bb, then rpmlint it.
#   sh packaging/build-rpm.sh [OUTDIR]      (default OUTDIR: ./dist)
# On Fedora the spec's real macros are used. Elsewhere (Debian: apt-get install rpm rpmlint
# python3-build python3-installer) Fedora's pyproject-rpm-macros/systemd-rpm-macros cannot be had,
# so packaging/rpm/macros.substitutes stands in for them, and --nodeps skips the BuildRequires
# check (Debian's rpm database is empty): see packaging/README.md.
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$repo/dist}" && cd "${1:-$repo/dist}" && pwd)
spec="$repo/packaging/rpm/cyrushelper.spec"
version=$(sed -n 's/^Version:[[:space:]]*//p' "$spec")
work=$(mktemp -d /tmp/cyrushelper-rpm.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/SOURCES" "$work/src/cyrushelper-$version"
# What a commit of this tree would hold (as build-deb.sh): tracked files plus new, not ignored ones.
(cd "$repo" && git ls-files --cached --others --exclude-standard |
    while IFS= read -r f; do if [ -e "$f" ] || [ -L "$f" ]; then echo "$f"; fi; done |
    tar -cf - --no-recursion -T -) | tar -xf - -C "$work/src/cyrushelper-$version"
tar -czf "$work/SOURCES/cyrushelper-$version.tar.gz" -C "$work/src" "cyrushelper-$version"
set -- --define "_topdir $work" --define "_sourcedir $work/SOURCES"
if [ -z "$(rpm --eval '%{?pyproject_wheel:real}')" ]; then
    set -- "$@" --load "$repo/packaging/rpm/macros.substitutes" --nodeps
fi
# Debian's own interpreters only, as for the .deb
PATH=/usr/sbin:/usr/bin:/sbin:/bin rpmbuild -bb "$@" "$spec"
cp "$work"/RPMS/noarch/*.rpm "$out"/
echo "built: $(ls "$out"/cyrushelper-*.rpm)"
if command -v rpmlint >/dev/null; then
    rpmlint -c "$repo/packaging/rpm/rpmlint.toml" -r "$repo/packaging/rpm/cyrushelper.rpmlintrc" "$spec" "$out"/cyrushelper-"$version"-*.rpm || true
fi
