#!/usr/bin/env bash
# Install the Debian packages QVD-py needs, idempotently (only what is missing).
#   scripts/install-deps.sh run    packages to run a node
#   scripts/install-deps.sh test   the same plus what the test suite uses
set -euo pipefail

RUN_PKGS=(
  python3 python3-venv python3-dev ca-certificates curl
  postgresql
  lxc uidmap mmdebstrap debootstrap zstd iproute2 iptables nftables bridge-utils
  nxagent nxproxy
)
TEST_PKGS=(
  xvfb xdotool xterm x11-utils x11-xserver-utils imagemagick openbox x11-apps
  busybox-static socat x11vnc tigervnc-viewer slapd ldap-utils tesseract-ocr tesseract-ocr-eng
)

case "${1:-run}" in
  run) want=("${RUN_PKGS[@]}") ;;
  test) want=("${RUN_PKGS[@]}" "${TEST_PKGS[@]}") ;;
  *) echo "usage: $0 run|test" >&2; exit 2 ;;
esac

if [ "$(id -u)" != 0 ]; then
  echo "install-deps: run as root (it installs Debian packages)" >&2
  exit 1
fi

missing=()
for p in "${want[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [ "$status" = "install ok installed" ] || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#want[@]} Debian packages present"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"
