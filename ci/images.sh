#!/usr/bin/env bash
# Builds the local container images from our own binaries; no base image is
# pulled (this machine has no registry):
#   viaduct:local               the balancer   (ENTRYPOINT viaduct)
#   viaduct-demo-backend:local  the demo UAS   (ENTRYPOINT viaduct-demo-backend)
#   viaduct-sipp:local          SIPp 3.6 (Debian sip-tester) (ENTRYPOINT sipp)
#   viaduct-test-proxy:local    a SIP proxy stand-in of the container tests
#                               (ENTRYPOINT viaduct-test-proxy)
# Each image is a root file system assembled in a folder: the binary, the
# shared libraries `ldd` lists and the dynamic loader, then `docker import`.
# An image whose content did not change is not imported again (its
# `viaduct.content` label holds the hash of its files).
#   usage: ci/images.sh   (release binaries; PROFILE=dev for debug ones;
#                          NO_BUILD=1 to package the binaries already built)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n[ci/images %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

if ! docker info >/dev/null 2>&1; then
  echo "ci/images: no Docker engine reachable (docker info failed)" >&2
  exit 1
fi

profile="${PROFILE:-release}"
if [ "${NO_BUILD:-0}" = 1 ]; then
  step "NO_BUILD=1: using the binaries already built"
else
  # --workspace --bins: the same build (and features) as ci/test.sh's, so
  # with PROFILE=dev this reuses the binaries the tests already built.
  step "cargo build --profile ${profile} --workspace --bins"
  cargo build --profile "${profile}" --locked --workspace --bins
fi
target_dir="${CARGO_TARGET_DIR:-${PWD}/target}"
case "${profile}" in dev) out="${target_dir}/debug" ;; *) out="${target_dir}/${profile}" ;; esac

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT

# rootfs DIR BINARY...: the binaries under /usr/local/bin (or their own
# absolute path for system ones), their libraries, the loader, /tmp.
rootfs() {
  local dir="$1"; shift
  mkdir -p "${dir}/tmp" "${dir}/etc" "${dir}/data"
  chmod 1777 "${dir}/tmp"
  echo 'root:x:0:0:root:/:/nonexistent' >"${dir}/etc/passwd"
  echo 'root:x:0:' >"${dir}/etc/group"
  echo 'hosts: files dns' >"${dir}/etc/nsswitch.conf"
  local bin lib
  for bin in "$@"; do
    case "${bin}" in
      /usr/bin/*|/bin/*) install -D -m 0755 "${bin}" "${dir}${bin}" ;;
      *) install -D -m 0755 "${bin}" "${dir}/usr/local/bin/$(basename "${bin}")"
         # debug info stays in target/; the image carries the code only
         command -v strip >/dev/null && strip --strip-debug "${dir}/usr/local/bin/$(basename "${bin}")" ;;
    esac
    # ldd lines: "libx.so => /path (addr)" and "/lib64/ld-linux-x86-64.so.2 (addr)"
    for lib in $(ldd "${bin}" | awk '/=> \//{print $3} /^\t\//{print $1}'); do
      mkdir -p "${dir}$(dirname "${lib}")"
      cp -L "${lib}" "${dir}${lib}"
    done
  done
  # Name resolution (container names on the private network) needs NSS.
  for lib in /lib/x86_64-linux-gnu/libnss_dns.so.2 /lib/x86_64-linux-gnu/libnss_files.so.2 \
             /lib/x86_64-linux-gnu/libresolv.so.2; do
    [ -e "${lib}" ] && cp -L "${lib}" "${dir}${lib}"
  done
  return 0
}

# image NAME DIR ENTRYPOINT: import DIR as NAME unless the same content is there.
image() {
  local name="$1" dir="$2" entrypoint="$3"
  local hash
  hash="$(cd "${dir}" && find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-32)"
  if [ "$(docker image inspect -f '{{ index .Config.Labels "viaduct.content" }}' "${name}" 2>/dev/null || true)" = "${hash}" ]; then
    step "${name}: unchanged (${hash})"
    return 0
  fi
  step "${name}: importing ($(du -sh "${dir}" | cut -f1))"
  tar -C "${dir}" -c . | docker import \
    --change "ENTRYPOINT ${entrypoint}" \
    --change "ENV PATH=/usr/local/bin:/usr/bin:/bin TERM=dumb" \
    --change "WORKDIR /data" \
    --change "LABEL viaduct.content=${hash}" \
    - "${name}" >/dev/null
}

rootfs "${work}/viaduct" "${out}/viaduct"
image viaduct:local "${work}/viaduct" '["/usr/local/bin/viaduct"]'

rootfs "${work}/demo" "${out}/viaduct-demo-backend"
image viaduct-demo-backend:local "${work}/demo" '["/usr/local/bin/viaduct-demo-backend"]'

rootfs "${work}/proxy" "${out}/viaduct-test-proxy"
image viaduct-test-proxy:local "${work}/proxy" '["/usr/local/bin/viaduct-test-proxy"]'

if ! command -v sipp >/dev/null 2>&1; then
  echo "ci/images: sipp is not installed (bash ci/install.sh installs Debian's sip-tester)" >&2
  exit 1
fi
rootfs "${work}/sipp" "$(command -v sipp)"
# SIPp's curses screen wants a terminal description even when not shown.
for ti in /lib/terminfo/d/dumb /usr/share/terminfo/d/dumb /lib/terminfo/x/xterm /usr/share/terminfo/x/xterm; do
  [ -e "${ti}" ] && install -D -m 0644 "${ti}" "${work}/sipp${ti}"
done
image viaduct-sipp:local "${work}/sipp" '["/usr/bin/sipp"]'

docker image prune -f --filter dangling=true --filter label=viaduct.content >/dev/null
step "images: $(docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^viaduct' | tr '\n' ' ')"
