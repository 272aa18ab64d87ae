#!/usr/bin/env bash
cd /work/reported-runs
bash bench.sh set2-lora --suite mini-lora --methods dreambooth,dreambooth-select,dpg,rpo --subjects-seed 2 --budgets 200,400 --baseline-budgets 800
bash bench.sh set0-final --suite mini --methods dreambooth,dreambooth-select,dpg,rpo --subjects-seed 0 --budgets 200,400 --baseline-budgets 800
bash bench.sh set1-final --suite mini --methods dreambooth,dreambooth-select,dpg,rpo --subjects-seed 1 --budgets 200,400 --baseline-budgets 800
