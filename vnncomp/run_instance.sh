#!/bin/bash
# VNN-COMP hook: run_instance.sh v1 CATEGORY ONNX VNNLIB RESULTS_FILE TIMEOUT
set -e
version=$1; category=$2; onnx=$3; vnnlib=$4; result=$5; timeout=$6
[ "$version" = "v1" ] || { echo "expected version v1, got '$version'" >&2; exit 1; }
jaxlirpa verify "$onnx" "$vnnlib" --timeout "$timeout" --out "$result"
