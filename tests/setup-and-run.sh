#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian 12 machine (as root)
# and run the whole suite. README.md's test command and .ci/run both call this.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq python3-venv busybox-static zstd umoci skopeo oci-image-tool \
    docker-registry apache2-utils podman buildah runc uidmap gcc libc6-dev tmux openssl \
    binutils-aarch64-linux-gnu qemu-user libcap2-bin nftables iproute2 slirp4netns >/dev/null

# This host's hybrid cgroups break crun; podman's default rlimits are refused here.
if ! grep -q 'kiln-tests' /etc/containers/containers.conf 2>/dev/null; then
  mkdir -p /etc/containers
  cat >> /etc/containers/containers.conf <<'CONF'
# kiln-tests: podman on this host needs runc and modest default ulimits
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
CONF
fi

python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'

set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$rc"
