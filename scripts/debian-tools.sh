#!/usr/bin/env bash
# Install the Debian tools the tests use, when missing, with one apt-get update:
# dig and kdig (independent DNS/DoQ clients), and dnsperf, unbound and dnsmasq
# (the benchmark's peers, which its smoke test runs). A temporary policy-rc.d
# keeps Debian from starting unbound's or dnsmasq's system service.
set -euo pipefail

missing=()
command -v dig >/dev/null || missing+=(bind9-dnsutils)
command -v kdig >/dev/null || missing+=(knot-dnsutils)
command -v dnsperf >/dev/null || missing+=(dnsperf)
[ -x /usr/sbin/unbound ] || command -v unbound >/dev/null || missing+=(unbound)
[ -x /usr/sbin/dnsmasq ] || command -v dnsmasq >/dev/null || missing+=(dnsmasq-base)
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod 755 "$policy"
    own_policy=1
fi
cleanup() { if [ "$own_policy" = 1 ]; then $sudo rm -f "$policy"; fi; }
trap cleanup EXIT
echo "installing ${missing[*]} with apt-get" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
