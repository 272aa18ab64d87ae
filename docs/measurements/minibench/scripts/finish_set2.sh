#!/usr/bin/env bash
# once run A (runs/set2) has all 24 subjects: pair its folders with run B's curve (DreamBooth at its best) and print
# README's set-2 rows and sentences (docs/minibench.md, "Reported set 2 ...": the rule fixed before the runs)
set -e
cd /work/reported-runs
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH=/work/reported2
py=/work/main/.venv/bin/python
rr=/work/main/benchmarks/readme_rows.py
folders=""
for m in dreambooth dreambooth-select dpg rpo dpg-select; do for b in 200 400 800; do folders="$folders runs/set2/$m@$b"; done; done
# the merge reads results only: main's code, whose merged report draws the frontiers with run B's curve
[ -d runs/set2-vs-best ] || PYTHONPATH= $py -m rewardbooth bench --merge $folders --curve runs/set2-dreambooth-best/dreambooth@* --output runs/set2-vs-best
for b in 200 400 800; do echo "## set 2, equal steps, $b"; $py $rr 2=runs/set2 --budget $b; echo; done
for b in 200 400 800; do echo "## set 2, equal seconds against run A's DreamBooth, $b"; $py $rr 2=runs/set2 --budget $b --equal-seconds; echo; done
echo "## set 2, equal seconds against DreamBooth at its best (every merged folder)"; $py $rr 2=runs/set2-vs-best --equal-seconds; echo
echo "## sentences"; $py $rr 2=runs/set2-vs-best --sentences "the best-tuned DreamBooth"
grep -a "^start\|^exit" logs/set2.log logs/set2-dreambooth-best.log
