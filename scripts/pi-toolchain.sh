#!/usr/bin/env bash
# Installs Debian's Rust 1.85 (the rustc-web/cargo-web that Debian bookworm
# and Raspberry Pi OS ship) and, with `cross`, what building and running
# patchcord for the Raspberry Pi needs on an x86_64 Debian 12 machine:
# gcc cross compilers and C libraries for armhf and arm64, qemu-user-static,
# and the Rust standard library of both ARM targets, extracted from Debian's
# packages (installing the :armhf packages would pull libllvm and can fail on
# multiarch version skew; the rlibs are all a build needs).
#
# usage: scripts/pi-toolchain.sh msrv|cross
# Does nothing for what is already there. Runs apt-get, so it needs root
# (or sudo). PATCHCORD_RUST_WEB_VERSION picks another Debian version of
# rustc-web; the host and target libraries must all be that one version.
set -euo pipefail

what=${1:-}
case "$what" in
  msrv|cross) ;;
  *) echo "usage: $0 msrv|cross" >&2; exit 2 ;;
esac

V=${PATCHCORD_RUST_WEB_VERSION:-1.85.0+dfsg3-1~deb12u3}
TARGETS=(armv7-unknown-linux-gnueabihf aarch64-unknown-linux-gnu)

fail() { echo "pi-toolchain: $*" >&2; exit 1; }

if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
else
  fail "needs root (or sudo) to install packages with apt-get"
fi
export DEBIAN_FRONTEND=noninteractive

updated=false
apt_update() {
  if ! $updated; then
    # A mirror mid-sync can make one index fail; what we need still resolves.
    "${as_root[@]}" apt-get update -qq || echo "pi-toolchain: apt-get update reported errors; going on" >&2
    updated=true
  fi
}

apt_install() {
  apt_update
  if ! "${as_root[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null; then
    fail "could not install: $* (is Debian's bookworm or bookworm-security archive reachable? 'apt-cache madison rustc-web' lists the versions; set PATCHCORD_RUST_WEB_VERSION to one)"
  fi
}

has_version() { dpkg-query -W -f '${Version}' "$1" 2>/dev/null | grep -qxF "$V"; }

# Debian's Rust 1.85: /usr/bin/rustc and /usr/bin/cargo, beside any rustup one.
if ! has_version rustc-web || ! has_version cargo-web || ! has_version libstd-rust-web-dev; then
  echo "pi-toolchain: installing Debian's rustc-web $V"
  apt_install "rustc-web=$V" "cargo-web=$V" "libstd-rust-web-dev=$V"
fi
[ -x /usr/bin/rustc ] && [ -x /usr/bin/cargo ] || fail "/usr/bin/rustc or /usr/bin/cargo missing after installing rustc-web"

[ "$what" = cross ] || exit 0

for arch in armhf arm64; do
  if ! dpkg --print-foreign-architectures | grep -qx "$arch"; then
    "${as_root[@]}" dpkg --add-architecture "$arch"
    updated=false
  fi
done

tools=()
command -v arm-linux-gnueabihf-gcc >/dev/null 2>&1 || tools+=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross)
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || tools+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
{ command -v qemu-arm-static && command -v qemu-aarch64-static; } >/dev/null 2>&1 || tools+=(qemu-user-static)
if [ ${#tools[@]} -gt 0 ]; then
  echo "pi-toolchain: installing ${tools[*]}"
  apt_install "${tools[@]}"
fi

rustlib=$(/usr/bin/rustc --print sysroot)/lib/rustlib
missing=()
for target in "${TARGETS[@]}"; do
  ls "$rustlib/$target/lib"/libstd-*.rlib >/dev/null 2>&1 || missing+=("$target")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "pi-toolchain: extracting the Rust standard library for ${missing[*]}"
  apt_update
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  # apt-get download fetches as the _apt user, which must be able to write here.
  chmod 777 "$work"
  (
    cd "$work"
    apt-get download -qq "libstd-rust-web-dev:armhf=$V" "libstd-rust-web-1.85:armhf=$V" \
      "libstd-rust-web-dev:arm64=$V" "libstd-rust-web-1.85:arm64=$V" \
      || fail "could not download the armhf/arm64 libstd-rust-web packages of version $V"
    for deb in *.deb; do dpkg -x "$deb" root; done
  )
  for target in "${missing[@]}"; do
    [ -d "$work/root/usr/lib/rustlib/$target" ] || fail "no $target standard library in the downloaded packages"
    "${as_root[@]}" cp -r "$work/root/usr/lib/rustlib/$target" "$rustlib/"
  done
fi
echo "pi-toolchain: ready ($(/usr/bin/rustc --version); ${TARGETS[*]})"
