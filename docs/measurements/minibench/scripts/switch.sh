#!/usr/bin/env bash
# once set2-lora's bench ends, run A (set2) moves from one worker to two: interrupted (it keeps its step), then rerun with --jobs 2
cd /work/reported-runs
while kill -0 19425 2>/dev/null; do sleep 20; done
while ! pgrep -f "output runs/set2$" > /dev/null; do sleep 20; done
pkill -INT -f "rewardbooth bench .*--output runs/set2$"
while pgrep -f "bench.sh set2 " > /dev/null; do sleep 5; done
JOBS=2 bash bench.sh set2 --suite mini --methods dreambooth,dreambooth-select,dpg,rpo,dpg-select --subjects-seed 2 --budgets 200,400,800
