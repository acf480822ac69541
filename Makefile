# patchcord: build, test, install. `make run` serves; `make test` tests.

PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man
CARGO ?= cargo
LISTEN ?= 0.0.0.0:3000

BIN := target/release/patchcord
SOURCES := $(shell find src -name '*.rs') Cargo.toml Cargo.lock

.PHONY: all build run test check lint-man bench install uninstall clean

all: build

build: $(BIN)

# install depends on this file, so `sudo make install` after `make` only copies.
$(BIN): $(SOURCES)
	$(CARGO) build --release --locked

run: $(BIN)
	./$(BIN) --listen $(LISTEN)

test:
	$(CARGO) test --locked
	sh tests/install.sh

check: test lint-man
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

# The benchmark: a table of figures (BENCH_ARGS, e.g. --json out.json, --only stream).
bench:
	$(CARGO) bench --locked --bench relay -- $(BENCH_ARGS)

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

clean:
	$(CARGO) clean
