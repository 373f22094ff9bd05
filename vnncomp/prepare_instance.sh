#!/bin/bash
# VNN-COMP hook: prepare_instance.sh v1 CATEGORY ONNX VNNLIB
# Checks that the network and property load (clear error otherwise) and warms the
# persistent compilation cache, so run_instance.sh measures verification, not compilation.
set -e
version=$1; category=$2; onnx=$3; vnnlib=$4
[ "$version" = "v1" ] || { echo "expected version v1, got '$version'" >&2; exit 1; }
pkill -f "jaxlirpa verify" || true
python3 -c "
import math, sys
from jaxlirpa import onnx, vnnlib
fn, shape = onnx.load(sys.argv[1])
vnnlib.read(sys.argv[2], num_inputs=math.prod(shape[1:]))
" "$onnx" "$vnnlib"
jaxlirpa verify "$onnx" "$vnnlib" --timeout 5 --quiet > /dev/null || true
exit 0
