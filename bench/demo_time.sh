#!/bin/bash
# `make demo` as a newcomer runs it: a fresh clone of this repository, an empty llava-gm cache (backbone
# conversion and vision features included), set-up included. Prints the wall time and the demo's table.
#
#   bench/demo_time.sh NAME [VAR=VALUE ...]
#   bench/demo_time.sh amx                                        # as the host is
#   bench/demo_time.sh noamx ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16  # an AMX host computing as one without AMX
set -u
name=$1; shift
repo=$(cd "$(dirname "$0")/.." && pwd)
dir=/tmp/demo-$name
rm -rf "$dir" "$dir-cache"
git clone -q "$repo" "$dir" && cd "$dir" || exit 1
echo "== $name $(date -u) $(git log --oneline | head -1) env: $*"; uptime
start=$(date +%s)
env LLAVA_GM_CACHE="$dir-cache" "$@" make demo > "$dir.log" 2>&1; rc=$?
echo "== $name rc=$rc wall $(( $(date +%s) - start )) s"; uptime
sed -n '/^model  /,/^demo finished/p' "$dir.log"
