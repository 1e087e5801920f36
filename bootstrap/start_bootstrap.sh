#!/usr/bin/env bash
# Start a bootstrap node from a config and print the multiaddrs others join with.
#   bootstrap/start_bootstrap.sh node_configs/head.yaml [extra `hexswarm node` options]
# The node runs in the foreground; Ctrl-C or SIGTERM stops it cleanly.
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: $0 CONFIG.yaml [hexswarm node options]" >&2
    exit 2
fi
config=$1
shift
hexswarm=${HEXSWARM:-hexswarm}
echo "bootstrap node; join with --bootstrap <one of these>:"
"$hexswarm" id --config "$config" | tail -n +2
exec "$hexswarm" node --config "$config" "$@"
