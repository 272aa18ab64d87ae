#!/usr/bin/env bash
# from the tenth session on: what is left of the reported runs, one at a time on both cores (each restores its record first)
cd /work/reported-runs
JOBS=2 bash bench.sh set2 --suite mini --methods dreambooth,dreambooth-select,dpg,rpo,dpg-select --subjects-seed 2 --budgets 200,400,800
JOBS=2 bash bench.sh set0-final --suite mini --methods dreambooth,dreambooth-select,dpg,rpo --subjects-seed 0 --budgets 200,400 --baseline-budgets 800
JOBS=2 bash bench.sh set1-final --suite mini --methods dreambooth,dreambooth-select,dpg,rpo --subjects-seed 1 --budgets 200,400 --baseline-budgets 800
