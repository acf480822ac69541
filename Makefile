# patchcord: build, test, install. `make run` serves; `make test` tests.

PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man
# install-service: the unit where systemd looks for it under PREFIX (it reads
# /usr/local/lib/systemd/system too), its options in /etc/default.
SYSTEMDUNITDIR ?= $(PREFIX)/lib/systemd/system
SYSCONFDIR ?= /etc
# cargo from PATH (rustup's or Debian's cargo-web), else rustup's usual
# place, else Debian's. `sudo make install` after `make` needs none: it copies.
CARGO ?= $(shell command -v cargo 2>/dev/null || { [ -x "$$HOME/.cargo/bin/cargo" ] && echo "$$HOME/.cargo/bin/cargo"; } || echo /usr/bin/cargo)
LISTEN ?= 0.0.0.0:3000
# The pubsub store links the system's SQLite (Debian: libsqlite3-dev; Raspberry
# Pi OS ships the library). Where it cannot be linked, SQLite is compiled in
# (cargo feature bundled-sqlite: about 0.7 MB more). FEATURES overrides.
FEATURES ?= $(shell echo 'int main(void){return 0;}' | $${CC:-cc} -x c - -lsqlite3 -o /dev/null >/dev/null 2>&1 || echo --features bundled-sqlite)

# The Raspberry Pi: Debian's Rust 1.85 (cargo-web) and its cross toolchains,
# installed by scripts/pi-toolchain.sh; ARM binaries run under qemu-user.
DEBIAN_CARGO := RUSTC=/usr/bin/rustc /usr/bin/cargo
ARMV7 := armv7-unknown-linux-gnueabihf
AARCH64 := aarch64-unknown-linux-gnu
CROSS_DIR := target/cross
# Each architecture's libsqlite3, from Debian's packages (pi-toolchain.sh).
SYSROOT := $(abspath $(CROSS_DIR))/sysroot
ARMV7_ENV := \
	CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_LINKER=arm-linux-gnueabihf-gcc \
	CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_RUNNER="qemu-arm-static -L /usr/arm-linux-gnueabihf -E LD_LIBRARY_PATH=$(SYSROOT)/armhf/usr/lib/arm-linux-gnueabihf" \
	SQLITE3_LIB_DIR=$(SYSROOT)/armhf/usr/lib/arm-linux-gnueabihf \
	SQLITE3_INCLUDE_DIR=$(SYSROOT)/armhf/usr/include
AARCH64_ENV := \
	CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
	CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64-static -L /usr/aarch64-linux-gnu -E LD_LIBRARY_PATH=$(SYSROOT)/arm64/usr/lib/aarch64-linux-gnu" \
	SQLITE3_LIB_DIR=$(SYSROOT)/arm64/usr/lib/aarch64-linux-gnu \
	SQLITE3_INCLUDE_DIR=$(SYSROOT)/arm64/usr/include
# The tests run against the aarch64 binary: the documented examples.
AARCH64_SMOKE ?= examples::

BIN := target/release/patchcord
SOURCES := $(shell find src assets -type f) Cargo.toml Cargo.lock

.PHONY: all build run test check lint-man bench install uninstall install-service uninstall-service clean msrv cross cross-test cluster-demo

all: build

build: $(BIN)

# install depends on this file, so `sudo make install` after `make` only copies.
$(BIN): $(SOURCES)
	$(CARGO) build --release --locked $(FEATURES)

run: $(BIN)
	./$(BIN) --listen $(LISTEN)

test:
	$(CARGO) test --locked $(FEATURES)
	sh tests/install.sh

check: test lint-man
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets $(FEATURES) -- -D warnings

# Three relays behind HAProxy on loopback (contrib/haproxy.cfg): HAProxy on
# port DEMO_PORT, the relays on the three after it. Ctrl-C stops them.
DEMO_PORT ?= 3000
cluster-demo: $(BIN)
	PORT=$(DEMO_PORT) BIN=$(BIN) bash contrib/cluster-demo.sh

# The benchmark: a table of figures (BENCH_ARGS, e.g. --json out.json, --only stream).
bench:
	$(CARGO) bench --locked $(FEATURES) --bench relay -- $(BENCH_ARGS)

# Debian's Rust 1.85 (what a Pi owner has): build, and run the unit tests.
msrv:
	bash scripts/pi-toolchain.sh msrv
	$(DEBIAN_CARGO) test --locked $(FEATURES) --bins --target-dir target/msrv

# Release binaries for 32-bit (armv7) and 64-bit (aarch64) Raspberry Pi OS.
cross:
	bash scripts/pi-toolchain.sh cross
	$(ARMV7_ENV) $(DEBIAN_CARGO) build --release --locked --target $(ARMV7) --target-dir $(CROSS_DIR)
	$(AARCH64_ENV) $(DEBIAN_CARGO) build --release --locked --target $(AARCH64) --target-dir $(CROSS_DIR)
	@ls -l $(CROSS_DIR)/$(ARMV7)/release/patchcord $(CROSS_DIR)/$(AARCH64)/release/patchcord
	@size=$$(stat -c %s $(CROSS_DIR)/$(ARMV7)/release/patchcord); \
	if [ "$$size" -gt 3145728 ]; then echo "armv7 binary is $$size bytes, over the 3 MiB budget"; exit 1; fi

# The whole suite against the armv7 binary under qemu-arm (test binaries and
# server emulated, curl and bash native); the examples against aarch64.
cross-test: cross
	$(ARMV7_ENV) $(DEBIAN_CARGO) test --locked --target $(ARMV7) --target-dir $(CROSS_DIR)
	$(AARCH64_ENV) $(DEBIAN_CARGO) test --locked --target $(AARCH64) --target-dir $(CROSS_DIR) -- $(AARCH64_SMOKE)

lint-man:
	@if command -v mandoc >/dev/null 2>&1; then \
		mandoc -Tlint -W warning man/patchcord.1; \
	else \
		out=$$(groff -man -Tutf8 -ww -z man/patchcord.1 2>&1); \
		if [ -n "$$out" ]; then echo "$$out"; exit 1; fi; \
	fi
	@echo "man page: lint clean"

install: $(BIN)
	install -Dm755 $(BIN) $(DESTDIR)$(BINDIR)/patchcord
	install -Dm644 man/patchcord.1 $(DESTDIR)$(MANDIR)/man1/patchcord.1

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/patchcord $(DESTDIR)$(MANDIR)/man1/patchcord.1

# The systemd unit, starting $(BINDIR)/patchcord (so `make install` too), and
# the example $(SYSCONFDIR)/default/patchcord unless there is one: that file
# is the administrator's and is never overwritten (nor removed).
install-service:
	install -d $(DESTDIR)$(SYSTEMDUNITDIR)
	sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g' \
		contrib/patchcord.service > $(DESTDIR)$(SYSTEMDUNITDIR)/patchcord.service
	chmod 644 $(DESTDIR)$(SYSTEMDUNITDIR)/patchcord.service
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/default/patchcord ]; then \
		echo "kept $(DESTDIR)$(SYSCONFDIR)/default/patchcord (the example is contrib/patchcord.default)"; \
	else \
		echo "install -Dm600 contrib/patchcord.default $(DESTDIR)$(SYSCONFDIR)/default/patchcord"; \
		install -Dm600 contrib/patchcord.default $(DESTDIR)$(SYSCONFDIR)/default/patchcord; \
	fi
	@echo "then: systemctl daemon-reload && systemctl enable --now patchcord"

# Stop it first: systemctl disable --now patchcord.
uninstall-service:
	rm -f $(DESTDIR)$(SYSTEMDUNITDIR)/patchcord.service
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/default/patchcord ]; then \
		echo "kept $(DESTDIR)$(SYSCONFDIR)/default/patchcord (yours to remove)"; \
	fi

clean:
	$(CARGO) clean
