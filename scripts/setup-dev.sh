#!/usr/bin/env bash
# Installs what vmmkit needs on a fresh Debian 12 machine (as root, or with sudo available):
# the Debian packages, then the core and every in-tree plugin, editable, in a virtual
# environment `.venv` at the top of the checkout (Debian's own Python refuses system-wide pip
# installs, PEP 668), and builds the test guests. Afterwards: `.venv/bin/vmmkit run`,
# `.venv/bin/python -m pytest`, or `. .venv/bin/activate` first.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(gcc make binutils libc6-dev qemu-system-x86 acpica-tools iproute2 busybox-static cpio
              gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu qemu-system-arm device-tree-compiler qemu-utils
              libseccomp2)  # libseccomp2: the seccomp filters (vmmkit.sandbox loads it at run time)
apt_packages+=(e2fsprogs)  # mkfs.ext4 and debugfs: the ext4 image of tests/linux/test_linux_pmem.py
python3 -c "import ensurepip, venv" 2>/dev/null || apt_packages+=(python3-venv)
# The cffi modules (run loop, virtqueue walker, block I/O) compile against Python.h.
python3 -c "import os, sysconfig; assert os.path.exists(sysconfig.get_paths()['include'] + '/Python.h')" \
    2>/dev/null || apt_packages+=(python3-dev)
missing=()
for pkg in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${pip[@]}" -e '.[test]' --config-settings editable_mode=compat
"${pip[@]}" -r requirements-dev.txt
make -s -C tests/guests
echo "setup-dev: vmmkit is installed in .venv (run .venv/bin/vmmkit, or '. .venv/bin/activate' first)"
