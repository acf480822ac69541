#!/bin/sh
# `make install DESTDIR=...` puts the binary and the man page where the
# Makefile says, the installed binary runs, and `make uninstall` removes both.
set -eu
dest=$(mktemp -d)
trap 'rm -rf "$dest"' EXIT
make -s install DESTDIR="$dest" >/dev/null
test -x "$dest/usr/local/bin/patchcord" || { echo "install: no binary"; exit 1; }
test -f "$dest/usr/local/share/man/man1/patchcord.1" || { echo "install: no man page"; exit 1; }
"$dest/usr/local/bin/patchcord" --version | grep -q '^patchcord ' || { echo "install: binary does not run"; exit 1; }
make -s uninstall DESTDIR="$dest" >/dev/null
if [ -e "$dest/usr/local/bin/patchcord" ] || [ -e "$dest/usr/local/share/man/man1/patchcord.1" ]; then
  echo "uninstall: files left behind"; exit 1
fi
echo "install: 1 passed, 0 failed"
