#!/bin/sh
# CUDA compiler launcher: runs the compile command and keeps its stderr
# (the `-Xptxas -v` resource report) in LOGDIR/<object>.log.
# usage: ptxas_log.sh LOGDIR COMPILER ARGS...
logdir=$1
shift
out=""
prev=""
for arg in "$@"; do
  [ "$prev" = "-o" ] && out=$arg
  prev=$arg
done
mkdir -p "$logdir"
log="$logdir/$(basename "${out:-unknown}").log"
"$@" 2>"$log.tmp"
rc=$?
# ptxas lines are the report; anything else (warnings, errors) is shown.
grep -v "^ptxas info" "$log.tmp" >&2
mv "$log.tmp" "$log"
exit $rc
