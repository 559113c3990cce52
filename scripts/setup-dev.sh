#!/usr/bin/env bash
# Installs what vmmkit needs on a fresh Debian 12 machine (as root, or with sudo available),
# installs the core and every in-tree plugin editable, and builds the test guests.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(gcc make binutils libc6-dev qemu-system-x86 acpica-tools iproute2 busybox-static cpio
              gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu qemu-system-arm device-tree-compiler)
missing=()
for pkg in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

pip=(python3 -m pip install -q --disable-pip-version-check)
"${pip[@]}" -e '.[test]' --config-settings editable_mode=compat
"${pip[@]}" -r requirements-dev.txt
make -s -C tests/guests
