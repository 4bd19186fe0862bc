#!/usr/bin/env bash
# Checks the one-way layering of src/ (ARCHITECTURE.md): every `crate::MODULE` reference
# in a module's files must name a module of a lower layer (or its own). Prints each
# violation as FILE:LINE: LAYER -> HIGHER_LAYER and exits 1 if there is any.
set -euo pipefail
cd "$(dirname "$0")/../src"
# layer rank of each top-level module (equal ranks may not use each other)
declare -A rank=([error]=0 [gpu]=1 [format]=2 [model]=3 [calib]=4 [methods]=5 [pipeline]=6 [search]=7 [eval]=8 [export]=8 [report]=9 [cli]=10 [main]=11)
bad=0
for f in $(find . -name '*.rs' | sort); do
  f=${f#./}
  top=${f%%/*}; top=${top%.rs}
  [ "$top" = lib ] && continue
  mine=${rank[$top]:?"$f: module $top has no layer in scripts/check-layers.sh"}
  # strip line comments, then list every crate::NAME (and lorap_gpu::NAME in main.rs)
  while IFS=: read -r line used; do
    [ "$used" = "$top" ] && continue
    theirs=${rank[$used]:?"$f:$line: unknown module $used"}
    if [ "$theirs" -ge "$mine" ]; then
      echo "$f:$line: $top -> $used"
      bad=1
    fi
  done < <(sed 's://.*$::' "$f" | grep -noE '(crate|lorap_gpu)::[a-z_]+' | sed -E 's/^([0-9]+):(crate|lorap_gpu)::/\1:/')
done
if [ "$bad" = 0 ]; then echo "layers: every import points down (error < gpu < format < model < calib < methods < pipeline < search < eval, export < report < cli)"; fi
exit "$bad"
