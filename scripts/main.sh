#!/usr/bin/env bash
# Set up (idempotent) and run the main job: the heuristics on the Huawei-East-1 test split, as a table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/edgecloud vmsched evaluate --split test \
  --policy first-fit --policy balance-fit --policy best-fit --policy worst-fit --policy random "$@"
