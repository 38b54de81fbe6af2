# Sourced by the prepared runs (gpu_run.sh, cpu_run.sh): their one helper.

step() {  # step NAME SECONDS COMMAND...: run, log to $OUT/NAME.log, note the status
  local name=$1 limit=$2
  shift 2
  [ "$limit" = 0 ] && return  # a limit of 0 skips the step
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
}
