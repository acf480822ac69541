#!/usr/bin/env bash
# Installs Debian's Rust 1.85 (the rustc-web/cargo-web that Debian bookworm
# and Raspberry Pi OS released with) and, with `cross`, what building and
# running patchcord for the Raspberry Pi needs on an x86_64 Debian 12
# machine: gcc cross compilers and C libraries for armhf and arm64,
# qemu-user-static, libsqlite3 for both (in target/cross/sysroot), and the
# Rust standard library of both ARM targets,
# extracted from Debian's packages (installing the :armhf packages would pull
# libllvm and can fail on multiarch version skew; the rlibs are all a build
# needs).
#
# usage: scripts/pi-toolchain.sh msrv|cross
# Does nothing for what is already there, and needs root (or sudo) only to
# install. The version is the newest 1.85.x the archive has, or the 1.85.x
# already installed; PATCHCORD_RUST_WEB_VERSION picks another Debian version
# of rustc-web. A newer rustc-web (bookworm-security ships one) is replaced
# by it: /usr/bin/rustc is then 1.85, the version patchcord promises to build with.
set -euo pipefail

what=${1:-}
case "$what" in
  msrv|cross) ;;
  *) echo "usage: $0 msrv|cross" >&2; exit 2 ;;
esac

TARGETS=(armv7-unknown-linux-gnueabihf aarch64-unknown-linux-gnu)
export DEBIAN_FRONTEND=noninteractive

fail() { echo "pi-toolchain: $*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    fail "needs root (or sudo) to run: $*"
  fi
}

updated=false
apt_update() {
  if ! $updated; then
    # A mirror mid-sync can make one index fail; what we need still resolves.
    as_root apt-get update -qq || echo "pi-toolchain: apt-get update reported errors; going on" >&2
    updated=true
  fi
}

apt_install() {
  apt_update
  if ! as_root apt-get install -y -qq --no-install-recommends --allow-downgrades "$@" >/dev/null; then
    fail "could not install: $* ('apt-cache madison rustc-web' lists the versions the archive has; PATCHCORD_RUST_WEB_VERSION picks one)"
  fi
}

installed() { dpkg-query -W -f '${Version}' "$1" 2>/dev/null || true; }

# The version: asked for, else the 1.85.x installed, else the newest 1.85.x.
V=${PATCHCORD_RUST_WEB_VERSION:-}
if [ -z "$V" ]; then
  V=$(installed rustc-web)
  case "$V" in
    1.85.*) ;;
    *)
      apt_update
      V=$(apt-cache madison rustc-web | awk '$3 ~ /^1\.85\./ {print $3}' | sort -V | tail -n 1)
      [ -n "$V" ] || fail "no rustc-web 1.85.x in the archive ('apt-cache madison rustc-web' lists what there is; PATCHCORD_RUST_WEB_VERSION picks one)"
      ;;
  esac
fi
# The standard library package is named after the upstream version (1.85).
STD=libstd-rust-web-$(echo "$V" | cut -d. -f1,2)

# Debian's Rust: /usr/bin/rustc and /usr/bin/cargo, beside any rustup one.
if [ "$(installed rustc-web)" != "$V" ] || [ "$(installed cargo-web)" != "$V" ] \
   || [ "$(installed libstd-rust-web-dev)" != "$V" ]; then
  echo "pi-toolchain: installing Debian's rustc-web $V"
  apt_install "rustc-web=$V" "cargo-web=$V" "libstd-rust-web-dev=$V" "$STD=$V"
fi
[ -x /usr/bin/rustc ] && [ -x /usr/bin/cargo ] || fail "/usr/bin/rustc or /usr/bin/cargo missing after installing rustc-web"

[ "$what" = cross ] || exit 0

for arch in armhf arm64; do
  if ! dpkg --print-foreign-architectures | grep -qx "$arch"; then
    as_root dpkg --add-architecture "$arch"
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

# The ARM standard libraries must be exactly the host compiler's version:
# each extracted one records its version, and is replaced when it differs.
rustlib=$(/usr/bin/rustc --print sysroot)/lib/rustlib
stale=()
for target in "${TARGETS[@]}"; do
  [ "$(cat "$rustlib/$target/patchcord-version" 2>/dev/null)" = "$V" ] || stale+=("$target")
done
if [ ${#stale[@]} -gt 0 ]; then
  echo "pi-toolchain: extracting the Rust $V standard library for ${stale[*]}"
  apt_update
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  # apt-get download fetches as the _apt user, which must be able to write here.
  chown _apt "$work" 2>/dev/null || true
  (
    cd "$work"
    apt-get download -qq "libstd-rust-web-dev:armhf=$V" "$STD:armhf=$V" \
      "libstd-rust-web-dev:arm64=$V" "$STD:arm64=$V" \
      || fail "could not download the armhf/arm64 libstd-rust-web packages of version $V"
    for deb in *.deb; do dpkg -x "$deb" root; done
  )
  for target in "${stale[@]}"; do
    [ -d "$work/root/usr/lib/rustlib/$target" ] || fail "no $target standard library in the downloaded packages"
    as_root rm -rf "${rustlib:?}/$target"
    as_root cp -r "$work/root/usr/lib/rustlib/$target" "$rustlib/"
    echo "$V" | as_root tee "$rustlib/$target/patchcord-version" >/dev/null
  done
fi

# libsqlite3 for each architecture (the pubsub store links the system's, as
# Raspberry Pi OS ships it), extracted from Debian's packages into
# $SYSROOT/<arch> beside the build: the linker finds it there and qemu-user
# loads it from there (LD_LIBRARY_PATH in the runner). Never installed as
# :armhf/:arm64 packages, which would replace the host's multiarch files.
SYSROOT=${PATCHCORD_PI_SYSROOT:-target/cross/sysroot}
for arch in armhf arm64; do
  want=$(apt-cache policy "libsqlite3-dev:$arch" 2>/dev/null | awk '/Candidate:/ {print $2}')
  if [ -z "$want" ] || [ "$want" = "(none)" ]; then
    apt_update
    want=$(apt-cache policy "libsqlite3-dev:$arch" | awk '/Candidate:/ {print $2}')
  fi
  [ -n "$want" ] && [ "$want" != "(none)" ] || fail "no libsqlite3-dev:$arch in the archive"
  [ "$(cat "$SYSROOT/$arch/patchcord-version" 2>/dev/null)" = "$want" ] && continue
  echo "pi-toolchain: extracting libsqlite3 $want for $arch into $SYSROOT/$arch"
  work=$(mktemp -d)
  chown _apt "$work" 2>/dev/null || true
  (
    cd "$work"
    apt-get download -qq "libsqlite3-dev:$arch=$want" "libsqlite3-0:$arch=$want" \
      || fail "could not download libsqlite3-dev:$arch $want"
    for deb in *.deb; do dpkg -x "$deb" root; done
  )
  rm -rf "${SYSROOT:?}/$arch"
  mkdir -p "$SYSROOT"
  cp -r "$work/root" "$SYSROOT/$arch"
  rm -rf "$work"
  echo "$want" > "$SYSROOT/$arch/patchcord-version"
done
echo "pi-toolchain: ready ($(/usr/bin/rustc --version); ${TARGETS[*]})"
