#!/bin/bash
# sandbox.sh -- the process side of testbed.container.SystemdContainer (see there);
# started by the container's keeper through `unshare --mount --cgroup --pid --fork --mount-proc`.
#
#   sandbox.sh init CGROUP LOWERDIR NSPAWN-ARGS...
#       PID 1 of the sandbox's PID namespace, in private mount + cgroup namespaces rooted at
#       CGROUP: mounts cgroup2 on /sys/fs/cgroup (systemd sees a pure-unified host and can only
#       touch its own subtree), a private tmpfs on /run (nspawn's /run/systemd/nspawn stays off the
#       host), builds overlay(lower=LOWERDIR, upper=tmpfs) -- LOWERDIR is / or another release's
#       root (testbed/images.py) -- and boots it with systemd-nspawn.
set -euo pipefail
stage=$1; shift
case $stage in
init)
  shift                              # CGROUP: only for ps/debugging
  lower=$1; shift
  mount -t cgroup2 cgroup2 /sys/fs/cgroup
  mount -t tmpfs -o mode=755 tmpfs /run
  ovl=/run/cyrushelper-overlay
  mkdir "$ovl"; mount -t tmpfs -o mode=755 tmpfs "$ovl"; mkdir "$ovl"/{upper,work,root}
  mount -t overlay overlay -o lowerdir="$lower",upperdir="$ovl/upper",workdir="$ovl/work" "$ovl/root"
  # bash stays PID 1 of this namespace (reaps, and takes the namespace down when nspawn exits)
  systemd-nspawn -D "$ovl/root" "$@" </dev/null &
  nspawn=$!
  wait "$nspawn"
  ;;
*)
  echo "usage: sandbox.sh init CGROUP LOWERDIR NSPAWN-ARGS..." >&2; exit 2 ;;
esac
