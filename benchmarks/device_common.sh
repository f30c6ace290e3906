# Shared by the device scripts (device_suite.sh, quality/device_testbed.sh); source it.
# run SECONDS NAME CMD...: the command's output to $OUT/NAME.log under a time limit, its exit code
# and last lines (warnings left out) echoed.
run() {
  local limit=$1 name=$2; shift 2
  echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name exit $?"; grep -v -i "warn" "$OUT/$name.log" | tail -n 12
}
