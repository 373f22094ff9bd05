#!/bin/bash
# VNN-COMP hook: install_tool.sh v1 (run from the repository root's vnncomp/ folder)
set -e
python3 -m pip install "$(dirname "$0")/.."
