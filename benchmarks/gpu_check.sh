#!/usr/bin/env bash
# The GPU check, in one run of about ten minutes: the device-parametrised tests on
# CUDA (parity fixture, fast against exact, fused norms, TF32 held off), training-step and translation speed against
# the official rule, then the compiled steps' tests (last, since compiling may take long). Each part has its own
# time limit, so that one stuck part leaves the others' figures; everything goes to $OUT/gpu_check.log (or
# ./gpu_check.log).
#
# It needs nothing installed but PyTorch and pytest (src/ goes on PYTHONPATH); the parity fixture comes from
# $UGATIT_SHARED, or from a copy in the ignored folder .gpu/shared (docs/performance.md, "GPUs", says how).
set -u
cd "$(dirname "$0")/.."
log="${OUT:-.}/gpu_check.log"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -z "${UGATIT_SHARED:-}" ] && [ -d .gpu/shared ]; then
    export UGATIT_SHARED="$PWD/.gpu/shared"
fi
python=${PYTHON:-python3}

part() {  # part SECONDS COMMAND...: run with a limit, log the command, its output, exit status and wall time
    local limit=$1
    shift
    echo "=== $* (limit ${limit} s)" | tee -a "$log"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    echo "=== exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$log"
}

part 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
part 30 "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
tests="tests/test_parity.py tests/test_fast.py tests/test_fused.py tests/test_devices.py"
part 150 "$python" -m pytest -q -p no:cacheprovider -k cuda $tests
part 90 "$python" benchmarks/train_step.py --device cuda --img-size 256 --reps 5 --memory-steps 3
part 90 "$python" benchmarks/train_step.py --device cuda --img-size 256 --no-light --reps 3 --memory-steps 2
part 60 "$python" benchmarks/translate.py --device cuda --reps 20 --batch-size 8
part 120 "$python" -m pytest -q -p no:cacheprovider -k cuda -m slow $tests  # compiled steps: compiling takes a while
