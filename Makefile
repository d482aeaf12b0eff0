# mktme-emu: the two commands a new user needs are `make vm` and `make test`;
# every target that needs set-up depends on `setup`, which is idempotent.

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
# gcc and python3-dev build the XTS engine's compiled loops (emulator/_blockxor.c).
APT_PACKAGES := qemu-system-x86 busybox-static ndctl e2fsprogs xfsprogs cpio gcc python3-dev
STAMP       := $(VENV)/.installed

.PHONY: setup apt venv kernel vm test test-unit test-vm bench lint demo clean

setup: apt venv

# Install only what is missing, so a second run does nothing (and needs no network).
apt:
	@missing=$$(for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	  done); \
	if [ -n "$$missing" ]; then \
	  echo "setup: installing apt packages:" $$missing; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py emulator/_blockxor.c
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

# The guest kernel (Debian's linux-image package, unpacked into a cache).
kernel: setup
	$(BIN)/mktme-emu kernel fetch

# A DAX-ready shell: the namespace in fsdax mode; more options with ARGS="...".
vm: setup kernel
	$(BIN)/mktme-emu boot --ns fsdax $(ARGS)

test: setup kernel
	$(BIN)/python -m pytest -ra

test-unit: setup
	$(BIN)/python -m pytest -ra -m 'not vm'

test-vm: setup kernel
	$(BIN)/python -m pytest -ra -m vm

bench: setup kernel
	$(BIN)/python -m bench

lint: setup
	$(BIN)/python -m pytest -q tests/test_lint.py

demo: setup kernel
	$(BIN)/mktme-emu scenario all

clean:
	rm -rf $(VENV) build *.egg-info emulator/_blockxor.*.so
