#!/usr/bin/env bash
# Everything dpr-jax measures on one lent GPU, in one command that fits a short lease
# (issues 21 and 22): the two-stage reader recipe, its evaluation at k = 1, 5, 20 on the held-out
# SQuAD articles, the answer-selection levers, reading speed against the PyTorch reference, and
# the accelerator rows of the ANN comparison; then, if the budget allows, training throughput and
# MFU (bert-base, batch 128: scripts/bench_train.py --gpu-mfu).
#
#   python scripts/gpu_session_prepare.py --squad-dpr /tmp/squad_dpr \
#       --results "runs/eval-st/fixed/results.hybrid (linear).json" --out .gpu     # here, once
#   OUT=gpu_out bash scripts/gpu_session.sh                                  # on the GPU host
#
# Inputs ($GPU_DATA, default .gpu, written by gpu_session_prepare.py): minilm/ (all-MiniLM-L6-v2
# as a Hugging Face directory), data/train.biencoder.json[.xz], data/dev.biencoder.json[.xz] and
# data/dev.results.json[.xz] (a seeded sample of validation questions with the retriever's top
# passages, and the same questions with their gold passages), data/dev.passages.tsv[.xz]. Work files go to $GPU_WORK (default /tmp/gpu_work); $OUT receives steps.log (the
# running record, written as it goes), results.tgz (every step's log, metrics, tables, plots)
# and reader/: the trained reader as float16 safetensors shards (scripts/gpu_session_prepare.py
# --restore-reader $OUT/reader turns them back into a model directory).
#
# A dry run on a CPU with small data in GPU_DATA: JAX_PLATFORMS=cpu GPU_PLATFORM=cpu
# GPU_SET="--set num_steps=2 ..." GPU_SAMPLE=8 GPU_READ="--questions 2 --rounds 1"
# GPU_ANN="--n 2000 --accel-force-cpu" GPU_MFU="--tiny --steps 1 --rounds 1".
#
# Each step runs under its own time limit, cut to what is left of $GPU_BUDGET seconds (default
# 550), so that the packing at the end always runs; a failed step is logged and the next runs.
set -u
D=${GPU_DATA:-.gpu}
O=${OUT:-gpu_out}
W=${GPU_WORK:-/tmp/gpu_work}
BUDGET=${GPU_BUDGET:-550}
PY=${PYTHON:-python3}
CLI=("$PY" -m dpr_jax.cli)
mkdir -p "$O" "$W/logs"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} TOKENIZERS_PARALLELISM=true
PLATFORM=${GPU_PLATFORM:-gpu}
SAMPLE=${GPU_SAMPLE:-1000}
read -r -a EXTRA <<<"${GPU_SET:-}"
read -r -a ANN <<<"${GPU_ANN:---n 1000000}"
read -r -a READ <<<"${GPU_READ:---questions 16 --rounds 3}"
read -r -a MFU <<<"${GPU_MFU:-}"
# GPU_STEPS: which parts run (two leases can split them); GPU_READER: the reader the later parts
# read with (default: the one stage 2 trains here; an earlier lease's: its $OUT/reader, the float16
# shards, carried back)
STEPS=" ${GPU_STEPS:-recipe eval levers ann read_speed mfu} "
READER=${GPU_READER:-$W/s2}
LOG="$O/steps.log"

want() { [[ $STEPS == *" $1 "* ]]; }

step() { # step NAME LIMIT_S COMMAND...: run it, its output to $W/logs/NAME.log
    local name=$1 limit=$2 left rc
    shift 2
    left=$((BUDGET - SECONDS))
    ((left < limit)) && limit=$left
    if ((limit < 15)); then
        echo "[$SECONDS s] $name: skipped, the budget is spent" >>"$LOG"
        return 1
    fi
    echo "[$SECONDS s] $name: start, limit ${limit}s: $*" >>"$LOG"
    timeout -k 5 "$limit" "$@" >"$W/logs/$name.log" 2>&1
    rc=$?
    echo "[$SECONDS s] $name: exit $rc" >>"$LOG"
    tail -n 12 "$W/logs/$name.log" | tr '\r' '\n' | tail -n 12 | sed 's/^/    /' >>"$LOG"
    return $rc
}

unpack() { # FILE: FILE itself, or FILE.xz decompressed into $W/data
    if [[ -f $1 ]]; then
        echo "$1"
    else
        local out="$W/data/$(basename "$1")"
        [[ -f $out ]] || { "$PY" -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'), 1 << 24)" "$1.xz" "$out.tmp" && mv "$out.tmp" "$out"; }
        echo "$out"
    fi
}

{
    echo "# gpu_session.sh $(date -u +%FT%TZ), budget ${BUDGET}s"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    "$PY" -c "import jax, flax, optax, orbax.checkpoint as o, torch, transformers; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" 2>&1 | tail -n 3
    nproc
} >>"$LOG"

mkdir -p "$W/data"
TRAIN=$(unpack "$D/data/train.biencoder.json")
DEV=$(unpack "$D/data/dev.biencoder.json")
RESULTS=$(unpack "$D/data/dev.results.json")
echo "[$SECONDS s] data: $(ls -la "$W/data" | tail -n +2 | awk '{print $5, $9}' | tr '\n' ' ')" >>"$LOG"
SET=(--set progress=False --set checkpoint_every=1000 "${EXTRA[@]}")
if [[ -f $READER/reader_meta.json ]]; then # float16 shards of an earlier lease's reader
    if "$PY" scripts/gpu_session_prepare.py --restore-reader "$READER" --out "$W/reader" \
        --tokenizer "$D/minilm" >>"$LOG" 2>&1; then
        READER=$W/reader
    else
        echo "[$SECONDS s] could not restore the reader in $READER (above)" >>"$LOG"
    fi
fi

# 1. Reader recipe, stage 1: SQuAD reading comprehension on the gold passages.
#    GPU_STAGE1_SET: settings for stage 1 alone (e.g. "--set num_epochs=1.0", the first lease's
#    recipe) and GPU_STAGE1_LIMIT its time limit (one epoch took 122 s, 76 s of it reading the
#    data; the config's two epochs ~170 s, unmeasured on a GPU).
read -r -a S1 <<<"${GPU_STAGE1_SET:-}"
want recipe && step stage1 "${GPU_STAGE1_LIMIT:-240}" "${CLI[@]}" train-reader \
    --config configs/reader_squad_minilm_stage1.py --train "$TRAIN" --dev "$DEV" --workdir "$W/s1" \
    --set "init_from=$D/minilm" "${SET[@]}" "${S1[@]}"
# 2. Stage 2: DPR's multi-passage training from stage 1's model; dev = retrieved passages.
export READER_STAGE1=$W/s1
want recipe && step stage2 210 "${CLI[@]}" train-reader \
    --config configs/reader_squad_minilm_stage2.py --train "$TRAIN" --dev "$RESULTS" \
    --workdir "$W/s2" "${SET[@]}"
# 3. The trained reader on the sampled validation questions: retrieved top k, then gold passage
#    (stage 1's own final dev evaluation is its gold-passage figure).
mkdir -p "$W/eval"
want eval && step read_retrieved 60 "${CLI[@]}" read --model "$W/s2" --results "$RESULTS" --ks 1,5,20 \
    --quiet --out "$W/eval/retrieved_s2.json"
want eval && step read_gold_s2 45 "${CLI[@]}" read --model "$W/s2" --results "$DEV" --format biencoder \
    --sample "$SAMPLE" --ks 1 --quiet --out "$W/eval/gold_s2.json"
#    Stage 1 end to end on the retrieved top passage alone (k = 1: it never learned selection),
#    as scripts/reader_recipe.sh reads it.
want eval && step read_retrieved_s1 30 "${CLI[@]}" read --model "$W/s1" --results "$RESULTS" --ks 1 \
    --quiet --out "$W/eval/retrieved_s1.json"
# 4. Answer-selection levers on the trained reader (outputs computed once, re-selected).
#    One answer length: the nine (selection, length) settings outran 60 s on an H200's host.
want levers && step levers 120 "$PY" scripts/bench_reader_levers.py --model "$READER" \
    --results "$RESULTS" --sample 0 --ks 1,5,10,20 --max-answer-lengths 10 \
    --json "$W/eval/levers.json"
# 5. ANN on the accelerator: exact / approx_max_k JAX search, exact PyTorch search, FAISS GPU
#    indexes where the installed FAISS has them.
want ann && step ann_accel 150 "$PY" scripts/bench_ann.py --mode accel --num-queries 1000 \
    --ks 10,100 --targets 0.90,0.95 --repeats 3 --out "$W/accel_1m" "${ANN[@]}"
# 6. Reading speed, ask's path (one question, 20 passages) and read's, against PyTorch on CUDA.
SQ=$(dirname "$DEV")
PASSAGES=$(unpack "$D/data/dev.passages.tsv")
[[ $(dirname "$PASSAGES") == "$SQ" ]] || cp "$PASSAGES" "$SQ/"
for dt in bfloat16 float32; do
    want read_speed || break
    step "bench_read_$dt" 75 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.4 "$PY" scripts/bench_read.py \
        --platform "$PLATFORM" --dtype "$dt" --data "$SQ" --model "$READER" "${READ[@]}" \
        --torch-batch 20,64,160 --json "$W/eval/bench_read_$dt.json"
done
# 7. Training throughput and MFU: bert-base dual encoder, batch 128 x (1 + 1 hard negative),
#    64 / 256 tokens, bfloat16 (the model FLOPs counted by hand; the peak from the device name).
want mfu && step train_mfu 120 "$PY" scripts/bench_train.py --gpu-mfu --out "$W/eval/train_mfu.json" \
    "${MFU[@]}"

# Pack: the reader (float16 shards) and everything the steps wrote.
if want recipe && [[ -d $W/s2/model ]]; then
    "$PY" scripts/gpu_session_prepare.py --pack-reader "$W/s2/model" --out "$O/reader" >>"$LOG" 2>&1
fi
for s in s1 s2; do
    mkdir -p "$W/runs/$s"
    cp "$W/$s"/{metrics.jsonl,config.json,curves.png} "$W/runs/$s/" 2>/dev/null
    cp "$W/$s/model/dpr_jax_model.json" "$W/runs/$s/" 2>/dev/null
done
tar czf "$O/results.tgz" -C "$W" logs eval runs $(cd "$W" && ls -d accel_1m 2>/dev/null)
echo "[$SECONDS s] packed: $(ls "$O" | tr '\n' ' ')" >>"$LOG"
