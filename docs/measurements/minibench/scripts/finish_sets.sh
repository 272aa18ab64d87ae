#!/usr/bin/env bash
# once sets 0 and 1 (reruns) and run A have all 24 subjects each: README's rows for the three reported sets, full weights,
# at equal steps (200, 400) and at equal seconds against each run's own DreamBooth curve (to 800 steps)
set -e
cd /work/reported-runs
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH=/work/reported2
py=/work/main/.venv/bin/python
rr=/work/main/benchmarks/readme_rows.py
for b in 200 400; do echo "## equal steps, $b"; $py $rr 0=runs/set0-final 1=runs/set1-final 2=runs/set2 --budget $b; echo; done
for b in 200 400; do echo "## equal seconds, $b"; $py $rr 0=runs/set0-final 1=runs/set1-final 2=runs/set2 --budget $b --equal-seconds; echo; done
grep -a "^start\|^exit" logs/set0-final.log logs/set1-final.log
