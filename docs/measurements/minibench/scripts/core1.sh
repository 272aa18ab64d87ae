#!/usr/bin/env bash
cd /work/reported-runs
bash bench.sh set2-dreambooth-best --suite mini --methods dreambooth --subjects-seed 2 --budgets 200,400,800,1600 --set train.learning_rate=2e-4
bash bench.sh set2 --suite mini --methods dreambooth,dreambooth-select,dpg,rpo,dpg-select --subjects-seed 2 --budgets 200,400,800
