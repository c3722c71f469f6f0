#!/usr/bin/env bash
# Installs what the build and the tests need when it is missing; does nothing when all is there.
set -euo pipefail

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is missing; install Rust (https://rustup.rs) first" >&2
  exit 1
fi
if command -v rustup >/dev/null 2>&1; then
  for component in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
      rustup component add "$component"
    fi
  done
  # The static build's standard library; the test that needs it says SKIPPED where it could not be added.
  if ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
    rustup target add x86_64-unknown-linux-musl \
      || echo "setup: could not add the x86_64-unknown-linux-musl target; the static build test is skipped" >&2
  fi
fi
# make and kill (procps) for the tests' process control; redis-server and redis-cli: the Redis tests start
# their own servers (standalone and a three-node cluster) on free ports, never a system Redis.
packages=()
command -v make >/dev/null 2>&1 || packages+=(make)
command -v kill >/dev/null 2>&1 || packages+=(procps)
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || packages+=(redis-tools)
# tests/okhttp_interop.rs: the 5.1.0 client's request path on the real OkHttp 3 (Debian's libokhttp-java, which
# pulls libokio-java), compiled with javac; a JDK only when javac is missing.
command -v javac >/dev/null 2>&1 || packages+=(default-jdk-headless)
if [ ! -f /usr/share/java/okhttp.jar ] || [ ! -f /usr/share/java/okio.jar ]; then
  packages+=(libokhttp-java libokio-java)
fi
# tests/deploy.rs: python3 and pip, for kubernetes-validate (below) and its PyYAML.
command -v python3 >/dev/null 2>&1 || packages+=(python3)
python3 -m pip --version >/dev/null 2>&1 || packages+=(python3-pip)
# The load benchmark (bench/run.sh, smoke-tested by tests/bench_smoke.rs): wrk drives the load, nginx is the
# upstream and the peer proxy (run from a temporary prefix, never as the system service), ss finds free ports.
command -v wrk >/dev/null 2>&1 || packages+=(wrk)
command -v nginx >/dev/null 2>&1 || packages+=(nginx-light)
command -v ss >/dev/null 2>&1 || packages+=(iproute2)
# tests/monitoring.rs: `promtool check rules` on monitoring/prometheus (Debian's prometheus package has it; with
# --no-install-recommends, and no init system in a container, nothing is started).
command -v promtool >/dev/null 2>&1 || packages+=(prometheus)
# tests/container.rs: podman builds and runs the image with no registry (scripts/base-images.sh unpacks the base
# images from Debian's packages with dpkg-deb); runc, since crun refuses a hybrid cgroup set-up; netavark and
# aardvark-dns for the test's own networks, where containers find each other by name.
command -v podman >/dev/null 2>&1 || packages+=(podman)
command -v runc >/dev/null 2>&1 || packages+=(runc)
[ -x /usr/lib/podman/netavark ] || packages+=(netavark)
[ -x /usr/lib/podman/aardvark-dns ] || packages+=(aardvark-dns)
# tests/container.rs's static build: Debian's musl-tools (musl-gcc, for the C in ring) and the musl target below.
command -v musl-gcc >/dev/null 2>&1 || packages+=(musl-tools)
if [ "${#packages[@]}" -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: missing ${packages[*]} and no apt-get to install them; install them by hand" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${packages[@]}"
  # Debian's packages start a system Redis on 6379 and a system nginx on 80; the tests use neither, and leave
  # them be.
fi
# kubernetes-validate bundles the Kubernetes schemas, so tests/deploy.rs runs offline once it is installed.
# Into the active python (a venv, pyenv), else per user; Debian's own python refuses a per-user install too
# without --break-system-packages (PEP 668), which with --user still touches only ~/.local.
if ! python3 -c 'import kubernetes_validate, yaml' >/dev/null 2>&1; then
  python3 -m pip install --quiet kubernetes-validate 2>/dev/null \
    || python3 -m pip install --quiet --user kubernetes-validate 2>/dev/null \
    || python3 -m pip install --quiet --user --break-system-packages kubernetes-validate
fi
# podman-compose, from PyPI (Debian 12's is 1.0.3), for tests/container.rs's run of docker/docker-compose.yml; the
# version the test was written against.
if ! python3 -c 'import podman_compose' >/dev/null 2>&1; then
  python3 -m pip install --quiet podman-compose==1.6.0 2>/dev/null \
    || python3 -m pip install --quiet --user podman-compose==1.6.0 2>/dev/null \
    || python3 -m pip install --quiet --user --break-system-packages podman-compose==1.6.0
fi
