#!/usr/bin/env bash
# [JOBS=N] bench.sh NAME ARGS...: one reported bench from the frozen worktree /work/reported2 (9d5482b), its record restored
# first and saved after it (and every few minutes by records.sh) into /work/main/docs/measurements/minibench/NAME.
name=$1; shift
cd /work/reported-runs
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH=/work/reported2
py=/work/main/.venv/bin/python
record=/work/main/docs/measurements/minibench/$name
[ -d "$record" ] && $py /work/reported2/benchmarks/bench_records.py restore "$record" runs/$name >> logs/$name.log 2>&1
start=$(date +%s)
echo "start $(date -u +%FT%TZ): rewardbooth bench $* --output runs/$name" >> logs/$name.log
$py -m rewardbooth bench "$@" --jobs ${JOBS:-1} --output runs/$name >> logs/$name.log 2>&1
echo "exit $? wall $(( $(date +%s) - start )) s at $(date -u +%FT%TZ)" >> logs/$name.log
$py /work/reported2/benchmarks/bench_records.py save runs/$name "$record" >> logs/$name.log 2>&1
