#!/usr/bin/env bash
# Local stand-ins for the base images docker/ names, for a machine that reaches Debian's packages but no
# container registry (the machines runonce is tested on). Each is a root file system unpacked from Debian 12
# packages with `dpkg-deb -x`, imported into podman under the name docker/Dockerfile or
# docker/docker-compose.yml uses, so both build and run unchanged:
#
#   gcr.io/distroless/cc-debian12:nonroot   the packages distroless's cc image is made of (glibc, libgcc,
#                                            libgomp, libstdc++, libssl, CA certificates, netbase, tzdata) and
#                                            its users: root, nonroot (65532) and nobody; USER 65532, no shell
#   redis:7-alpine                           Debian's redis-server 7.0 and redis-cli with their libraries (Redis's
#                                            own defaults: protected mode on, which the official image turns off
#                                            when it builds Redis; docker-compose.yml turns it off by flag)
#
# Usage: bash scripts/base-images.sh     (podman honours CONTAINERS_CONF and CONTAINERS_STORAGE_CONF)
# It needs apt-get (with package lists), dpkg-deb, tar and podman; it runs as root, as rootful podman does.
set -euo pipefail

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# unpack ROOT PACKAGE...: the packages, at the versions apt would install, unpacked into ROOT.
unpack() {
  local root=$1
  shift
  # A folder per root: one version of each package in it, whatever an apt-get update between roots changed.
  local debs="$work/debs-$(basename "$root")"
  mkdir -p "$root" "$debs"
  # Package lists may be missing on a machine that installed nothing yet: fetch them once, then try again.
  (cd "$debs" && { apt-get download -qq -o APT::Sandbox::User=root "$@" 2>/dev/null \
    || { apt-get update -qq && apt-get download -qq -o APT::Sandbox::User=root "$@"; }; })
  for package in "$@"; do
    dpkg-deb -x "$debs/${package}"_*.deb "$root"
  done
}

# users ROOT: distroless's accounts and folders.
users() {
  local root=$1
  mkdir -p "$root/etc" "$root/home/nonroot" "$root/root" "$root/tmp"
  cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat >"$root/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF
  chown 65532:65532 "$root/home/nonroot"
  chmod 700 "$root/root"
  chmod 1777 "$root/tmp"
}

# image ROOT NAME CHANGE...: ROOT as the image NAME, with Dockerfile instructions CHANGE.
image() {
  local root=$1 name=$2
  shift 2
  local changes=()
  for change in "$@"; do
    changes+=(--change "$change")
  done
  tar --numeric-owner -C "$root" -c . | podman import --quiet "${changes[@]}" - "$name" >/dev/null
  echo "base-images: $name"
}

distroless="$work/distroless"
unpack "$distroless" base-files netbase tzdata ca-certificates libc6 libgcc-s1 libgomp1 libstdc++6 libssl3
users "$distroless"
# What update-ca-certificates would write at install time (distroless ships the same bundle).
mkdir -p "$distroless/etc/ssl/certs"
cat "$distroless"/usr/share/ca-certificates/mozilla/*.crt >"$distroless/etc/ssl/certs/ca-certificates.crt"
rm -rf "$distroless/usr/share/doc" "$distroless/usr/share/man" "$distroless/usr/share/lintian"
image "$distroless" gcr.io/distroless/cc-debian12:nonroot \
  'USER 65532:65532' 'WORKDIR /home/nonroot' 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'

redis="$work/redis"
unpack "$redis" redis-server redis-tools libc6 libgcc-s1 libstdc++6 libatomic1 libjemalloc2 liblzf1 libssl3 \
  libsystemd0 libcap2 libgcrypt20 libgpg-error0 liblz4-1 liblzma5 libzstd1
users "$redis"
rm -rf "$redis/usr/share/doc" "$redis/usr/share/man" "$redis/usr/share/lintian"
image "$redis" docker.io/library/redis:7-alpine \
  'USER 65534:65534' 'WORKDIR /tmp' 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  'CMD ["redis-server"]'
