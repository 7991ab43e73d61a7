# The newcomer's three commands: make setup, make run, make test.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := python3 python3-venv python3-dev gcc make pkg-config git \
	redis-server postgresql \
	libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-daemon-driver-storage-iscsi-direct \
	libvirt-clients libvirt-dev libxml2-utils \
	qemu-system-x86 qemu-utils qemu-block-extra \
	tgt lvm2 thin-provisioning-tools xfsprogs btrfs-progs e2fsprogs fdisk parted \
	busybox-static linux-image-amd64 cpio kmod iproute2 util-linux util-linux-extra dosfstools mtools \
	openssh-server openssh-client zstd dnsmasq-base dnsmasq-utils debootstrap chromium

.PHONY: setup run test test-fast bench bench-clone bench-migrate bench-ha

setup:
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(APT_PACKAGES)
	# npm for the web console's packages: Debian's, unless a Node.js bringing its own npm is installed.
	command -v npm >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nodejs npm
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	npm ci --prefix api/ui --no-audit --no-fund

run:
	$(VENV)/bin/laxcluster run

test:
	$(VENV)/bin/pytest -ra

test-fast:
	$(VENV)/bin/pytest -ra -m "not integration"

bench:
	$(PY) bench/jobs.py
	$(PY) bench/vms.py

# Needs root and about 35 GiB free under $$TMPDIR.
bench-clone:
	$(PY) bench/clone.py

bench-migrate:
	$(PY) bench/migrate.py

bench-ha:
	$(PY) bench/ha.py
