#!/usr/bin/env bash
# every 5 minutes: each bench's record into /work/main/docs/measurements/minibench (committed by hand)
cd /work/reported-runs
while true; do
  for d in runs/*/; do n=$(basename $d)
    /work/main/.venv/bin/python /work/reported2/benchmarks/bench_records.py save runs/$n /work/main/docs/measurements/minibench/$n > /dev/null 2>&1
  done
  sleep 300
done
