#!/usr/bin/env bash
# once sets 0 and 1 (reruns) and run A have all 24 subjects each: README's rows for the three reported sets, full weights,
# at equal steps (200, 400) and at equal seconds against each run's own DreamBooth curve (to 800 steps); the sentences and the reruns' means
set -e
cd ${REPORTED:-/work/reported-runs}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH=/work/reported2
py=/work/main/.venv/bin/python
rr=/work/main/benchmarks/readme_rows.py
for b in 200 400; do echo "## equal steps, $b"; $py $rr 0=runs/set0-final 1=runs/set1-final 2=runs/set2 --budget $b; echo; done
for b in 200 400; do echo "## equal seconds, $b"; $py $rr 0=runs/set0-final 1=runs/set1-final 2=runs/set2 --budget $b --equal-seconds; echo; done
echo "## sentences (docs/minibench.md: the rule for sets 0 and 1, fixed before their numbers were read)"
$py $rr 0=runs/set0-final 1=runs/set1-final --sentences "DreamBooth at its MiniBench rate (4e-4, to 800 steps)"; echo
echo "## means (identity_kept / prompt_ok / CPU seconds per subject)"
for n in 0 1; do $py - runs/set$n-final/results.json "$n" <<'PY'
import json, sys
for k, v in sorted(json.load(open(sys.argv[1])).items(), key=lambda kv: (kv[0].split("@")[0], int(kv[0].split("@")[1]))):
    print(f"set {sys.argv[2]} {k}: {v['identity_kept']:.3f} / {v['prompt_ok']:.3f} / {v['seconds']:.1f}")
PY
done
grep -a "^start\|^exit" logs/set0-final.log logs/set1-final.log
