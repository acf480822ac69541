#!/bin/sh
# `make install DESTDIR=...` puts the binary and the man page where the
# Makefile says, the installed binary runs, and `make uninstall` removes both.
# `make install-service` stages the systemd unit with its paths filled in and
# the example options file (never overwriting one that is there), and
# `systemd-analyze verify` finds nothing to say about the unit.
set -eu
dest=$(mktemp -d)
trap 'rm -rf "$dest"' EXIT
passed=0
skipped=0
fail() { echo "$1"; exit 1; }

make -s install DESTDIR="$dest" >/dev/null
test -x "$dest/usr/local/bin/patchcord" || fail "install: no binary"
test -f "$dest/usr/local/share/man/man1/patchcord.1" || fail "install: no man page"
"$dest/usr/local/bin/patchcord" --version | grep -q '^patchcord ' || fail "install: binary does not run"
help=$("$dest/usr/local/bin/patchcord" --help)
make -s uninstall DESTDIR="$dest" >/dev/null
if [ -e "$dest/usr/local/bin/patchcord" ] || [ -e "$dest/usr/local/share/man/man1/patchcord.1" ]; then
  fail "uninstall: files left behind"
fi
passed=$((passed + 1))

# The service, staged under DESTDIR with the default PREFIX.
make -s install-service DESTDIR="$dest" >/dev/null
unit="$dest/usr/local/lib/systemd/system/patchcord.service"
defaults="$dest/etc/default/patchcord"
test -f "$unit" || fail "install-service: no unit in \$(PREFIX)/lib/systemd/system"
for line in 'ExecStart=/usr/local/bin/patchcord' 'EnvironmentFile=-/etc/default/patchcord' \
  'ExecReload=/bin/kill -HUP $MAINPID' 'DynamicUser=yes'; do
  grep -qxF "$line" "$unit" || fail "install-service: the unit lacks the line $line"
done
! grep -n '@[A-Z]*@' "$unit" || fail "install-service: a placeholder is left in the unit"
cmp -s contrib/patchcord.default "$defaults" || fail "install-service: no example $defaults"
[ "$(stat -c %a "$defaults")" = 600 ] || fail "install-service: $defaults is not mode 0600"
# Every variable the example names is one that patchcord reads.
for name in $(grep -o 'PATCHCORD_[A-Z][A-Z_]*' contrib/patchcord.default | sort -u); do
  printf '%s\n' "$help" | grep -qw "$name" ||
    fail "install-service: the example names $name, which patchcord --help does not"
done
# An options file that is there already is the administrator's.
echo 'PATCHCORD_LISTEN=127.0.0.1:4000' >"$defaults"
make -s install-service DESTDIR="$dest" >/dev/null
[ "$(cat "$defaults")" = 'PATCHCORD_LISTEN=127.0.0.1:4000' ] || fail "install-service: overwrote $defaults"
make -s uninstall-service DESTDIR="$dest" >/dev/null
[ ! -e "$unit" ] || fail "uninstall-service: the unit is left behind"
[ -e "$defaults" ] || fail "uninstall-service: removed the administrator's $defaults"
passed=$((passed + 1))

# The unit as systemd sees it: installed for real under a PREFIX of its own
# (no DESTDIR), so that the binary it starts exists. `verify` exits 0 even on
# an unknown key, so any output at all fails. Documentation=man:patchcord(1)
# is checked against the installed page when `man` is there (MANPATH names
# only that page's tree); without `man` it cannot be, hence --man=no.
if command -v systemd-analyze >/dev/null 2>&1; then
  root="$dest/root"
  make -s install install-service PREFIX="$root" SYSCONFDIR="$root/etc" >/dev/null
  unit="$root/lib/systemd/system/patchcord.service"
  grep -qxF "ExecStart=$root/bin/patchcord" "$unit" || fail "install-service: ExecStart is not $root/bin/patchcord"
  if command -v man >/dev/null 2>&1; then
    if out=$(MANPATH="$root/share/man" systemd-analyze verify "$unit" 2>&1); then status=0; else status=$?; fi
  else
    echo "install: no man(1), so Documentation= is not checked (systemd-analyze verify --man=no)"
    if out=$(systemd-analyze verify --man=no "$unit" 2>&1); then status=0; else status=$?; fi
  fi
  if [ "$status" -ne 0 ] || [ -n "$out" ]; then
    echo "$out"
    fail "install-service: systemd-analyze verify exited $status and said the above about the unit"
  fi
  make -s uninstall-service uninstall PREFIX="$root" SYSCONFDIR="$root/etc" >/dev/null
  passed=$((passed + 1))
else
  echo "SKIP: systemd-analyze not found (install the systemd package): the unit is NOT verified" >&2
  skipped=1
fi

if [ "$skipped" -gt 0 ]; then
  echo "install: $passed passed, 0 failed, $skipped skipped"
else
  echo "install: $passed passed, 0 failed"
fi
