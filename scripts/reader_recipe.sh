#!/usr/bin/env bash
# The two-stage reader recipe (issue 21, README "The two-stage reader recipe") from the SQuAD
# v1.1 training file to its evaluation, on one machine (bash >= 4, GNU coreutils), in one
# resumable command:
#
#   DATA=/path/to/data RUN=runs/recipe bash scripts/reader_recipe.sh
#   DATA=... S2_SET="--set num_steps=500 --set eval_every=250" bash scripts/reader_recipe.sh  # CPU
#
# Re-running the same command resumes it: a step whose marker (the last file it writes) exists is
# skipped and a training stage resumes from its checkpoints, so the recipe can run in the
# background across sessions (hours on a 2-core CPU; README (c)). Each step's command (with its
# options) is kept in $RUN/steps/NAME.command when it starts; a re-run whose command for a
# finished step differs is refused (one line, exit 2), so a changed option is not silently
# answered with what other options made (an unfinished step runs again: a training refuses by
# itself to resume a checkpoint of another configuration). A step also keeps when the steps it
# reads finished ($RUN/steps/NAME.after, from their NAME.done): one whose inputs were re-made
# since (their output removed and made again) is refused the same way, finished or not, so to
# re-make a step remove its output and those of the steps that read it. Steps, in $RUN:
#   squad/        prepare-squad --chunking fixed (the 100-word passages, 44 held-out articles;
#                 made in squad.partial/, the script's own, then renamed)
#   minilm_st/    all-MiniLM-L6-v2 converted (the retriever's start)
#   retriever/    the repo's best retriever: configs/squad_minilm_st.py
#   eval-st/      quickstart --no-reader: its retrieval (BM25, dense, hybrid) on the held-out
#                 questions
#   data/         scripts/gpu_session_prepare.py --eval-only: a seeded 1,000 of the held-out
#                 questions with the hybrid (linear) top 20 passages, their gold passages and
#                 their SQuAD paragraphs
#   reader-s1/    stage 1: configs/reader_squad_minilm_stage1.py (gold passages, two epochs)
#   reader-s2/    stage 2: configs/reader_squad_minilm_stage2.py (DPR's multi-passage training)
#   eval/         the table's reads (dpr-jax read --out; metrics in NAME.json.config.json):
#                 stage 1 (read before stage 2 trains) on every held-out question's gold
#                 passage and the 1,000's retrieved top 1; stage 2 on the 1,000's retrieved top
#                 1 / 5 / 20, their gold passages and paragraphs, and every held-out question's
#                 gold passage; summary.md at the end (EM / F1 with the EM's 95% interval)
#
# Environment: DATA (a folder with squad/train-v1.1.json; default $DPR_JAX_DATA), RUN (default
# runs/reader-recipe; new, empty or an earlier run's), MINILM (a Hugging Face all-MiniLM-L6-v2
# directory, the start of the retriever and of stage 1; default "minilm", the offline
# package's, as `dpr-jax convert` and the stage-1 config read it), PYTHON
# (default the repo's .venv of scripts/setup.sh, else python3): relative paths
# from where it is started; RETRIEVER_SET / S1_SET / S2_SET (extra options of each training, e.g.
# "--set num_steps=500"), QUICKSTART_OPTS (extra options of the retrieval evaluation). A failed
# step (or one that ends without its marker) stops the script; fix the cause and re-run. Logs:
# $RUN/recipe.log (the steps, their commands and times); the commands' own output as they print it.
set -euo pipefail
abspath() { if [[ $1 == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi; }
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA=${DATA:-${DPR_JAX_DATA:-}}
if [[ -z $DATA ]]; then
    echo "reader_recipe.sh: DATA is not set (a folder with squad/train-v1.1.json; or DPR_JAX_DATA)" >&2
    exit 2
fi
DATA=$(abspath "$DATA")
SQUAD=$DATA/squad/train-v1.1.json
if [[ ! -f $SQUAD ]]; then
    echo "reader_recipe.sh: ${SQUAD}: no such file (DATA must name a folder with squad/train-v1.1.json)" >&2
    exit 2
fi
RUN=$(abspath "${RUN:-runs/reader-recipe}")
# RUN holds only what the recipe writes: new, empty, or an earlier run's (its recipe.log); so
# never DATA itself, or a folder of the user's own files
if [[ -e $RUN && ! -d $RUN ]]; then
    echo "reader_recipe.sh: RUN $RUN is a file, not a folder; choose a new folder" >&2
    exit 2
fi
if [[ -d $RUN && ! -e $RUN/recipe.log ]] && [[ -n $(ls -A "$RUN") ]]; then
    echo "reader_recipe.sh: RUN $RUN is a non-empty folder that is no recipe run (no recipe.log);" \
        "choose a new or empty folder" >&2
    exit 2
fi
MINILM=${MINILM:-minilm}
S1_INIT=() # stage 1 starts from the same MiniLM (the config says the package's)
if [[ $MINILM != minilm ]]; then
    MINILM=$(abspath "$MINILM")
    S1_INIT=(--set "init_from=$MINILM")
fi
if [[ -z ${PYTHON:-} && -x $REPO/.venv/bin/python ]]; then
    PYTHON=$REPO/.venv/bin/python # scripts/setup.sh's
fi
PY=${PYTHON:-python3}
[[ $PY == */* ]] && PY=$(abspath "$PY")
CLI=("$PY" -m dpr_jax.cli)
cd "$REPO"
read -r -a RET_SET <<<"${RETRIEVER_SET:-}"
read -r -a S1 <<<"${S1_SET:-}"
read -r -a S2 <<<"${S2_SET:-}"
read -r -a QS <<<"${QUICKSTART_OPTS:-}"
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$RUN/eval" "$RUN/steps"
LOG=$RUN/recipe.log
: >>"$LOG" # first: RUN is a recipe run from here on
# one run of the recipe at a time in a RUN (flock(1) of util-linux, where there is one; the
# commands it starts hold the lock too, so a killed script's training still holds it)
if command -v flock >/dev/null; then
    exec 9>>"$RUN/recipe.lock"
    if ! flock -n 9; then
        echo "reader_recipe.sh: RUN $RUN is in use by another run of the recipe (it holds" \
            "$RUN/recipe.lock); wait for it to end, or stop it" >&2
        exit 2
    fi
fi

now() { date -u +%FT%TZ; }

command_of() { # the command as recorded: the run, repo and interpreter paths as names
    local a out=()
    for a in "$@"; do
        if [[ $a == "$PY" ]]; then
            a=python
        else
            a=${a//"$RUN"/'$RUN'}
            a=${a//"$REPO"/'$REPO'}
        fi
        out+=("$a")
    done
    echo "${out[*]}"
}

stamps_of() { # the finish stamps of the steps named (each "NAME STAMP", one a line)
    local d
    for d in "$@"; do
        echo "$d $(cat "$RUN/steps/$d.done" 2>/dev/null || echo unfinished)"
    done
}

step() { # step NAME "READS" OUTPUT MARKER COMMAND...: run COMMAND unless MARKER (its last file)
    # exists; READS: the steps whose outputs it reads
    local name=$1 reads=$2 output=$3 marker=$4 cmd was="" record=$RUN/steps/$1.command
    local after=$RUN/steps/$1.after stamps read_then=""
    shift 4
    cmd=$(command_of "$@")
    # shellcheck disable=SC2086 # READS: names split on spaces
    stamps=$(stamps_of $reads)
    [[ -f $record ]] && was=$(<"$record")
    [[ -f $after ]] && read_then=$(<"$after")
    local made=$output
    [[ $marker == "$output"/* ]] || made="$output and $marker"
    if [[ (-e $marker || -e $output) && -f $after && $read_then != "$stamps" ]]; then
        local d changed=()
        for d in $reads; do
            grep -qxF "$(stamps_of "$d")" "$after" || changed+=("$d")
        done
        echo "reader_recipe.sh: step $name: $made came from an earlier output of step" \
            "${changed[*]}, made again since (see $after and $RUN/steps/${changed[0]}.done)." \
            "Remove $made and the later steps' outputs to re-make them from it" | tee -a "$LOG" >&2
        exit 2
    fi
    if [[ -e $marker ]]; then
        if [[ -n $was && $was != "$cmd" ]]; then
            echo "reader_recipe.sh: step $name: $made was made by other options" \
                "($record: $was); now: $cmd. Run with the same options, or remove $made and" \
                "the later steps' outputs to re-make it" | tee -a "$LOG" >&2
            exit 2
        fi
        echo "[$(now)] $name: done before ($marker), skipped" | tee -a "$LOG"
        return 0
    fi
    if [[ -e $output && -n $was && $was != "$cmd" ]]; then # unfinished: the command judges
        echo "[$(now)] $name: started before with other options ($was)" | tee -a "$LOG"
    fi
    rm -f "$RUN/steps/$name.done"
    echo "$cmd" >"$record.partial" && mv "$record.partial" "$record"
    echo "$stamps" >"$after.partial" && mv "$after.partial" "$after"
    echo "[$(now)] $name: start: $*" | tee -a "$LOG"
    local t0=$SECONDS rc=0
    "$@" || rc=$?
    if ((rc == 0)) && [[ ! -e $marker ]]; then
        echo "[$(now)] $name: exit 0 without $marker (did its options stop it early?)" |
            tee -a "$LOG" >&2
        rc=1
    fi
    if ((rc != 0)); then
        echo "[$(now)] $name: failed (exit $rc); fix the cause and re-run" | tee -a "$LOG" >&2
        exit "$rc"
    fi
    date -u +%FT%T.%NZ >"$RUN/steps/$name.done"
    echo "[$(now)] $name: done in $((SECONDS - t0)) s" | tee -a "$LOG"
}

prepare() { # prepare() SQUAD: prepare-squad writes its folder file by file: made aside, then
    # renamed (step runs it in an || list, where set -e does not act: failures returned by hand)
    rm -rf "$RUN/squad.partial" || return
    "${CLI[@]}" prepare-squad --squad "$1" --out "$RUN/squad.partial" --chunking fixed \
        --quiet || return
    mv "$RUN/squad.partial" "$RUN/squad"
}
step prepare "" "$RUN/squad" "$RUN/squad/config.json" prepare "$SQUAD"
step convert "" "$RUN/minilm_st" "$RUN/minilm_st/manifest.json" "${CLI[@]}" convert \
    --from-hf "$MINILM" --out "$RUN/minilm_st"
step retriever "prepare convert" "$RUN/retriever" "$RUN/retriever/model/manifest.json" \
    env DPR_JAX_SQUAD_DPR="$RUN/squad" \
    DPR_JAX_MINILM_ST="$RUN/minilm_st" "${CLI[@]}" train --config configs/squad_minilm_st.py \
    --workdir "$RUN/retriever" --set eval_at_start=False ${RET_SET[@]+"${RET_SET[@]}"}
RESULTS="$RUN/eval-st/fixed/results.hybrid (linear).json"
step retrieval "retriever" "$RUN/eval-st" "$RUN/eval-st/fixed/retrieval_metrics.json" \
    "${CLI[@]}" quickstart --data "$DATA" \
    --no-reader --max-articles 0 --max-questions 0 --chunking fixed \
    --retriever "$RUN/retriever/model" --workdir "$RUN/eval-st" ${QS[@]+"${QS[@]}"}
step sample "prepare retrieval" "$RUN/data" "$RUN/data/dev.paragraphs.json.xz" "$PY" scripts/gpu_session_prepare.py \
    --squad-dpr "$RUN/squad" --results "$RESULTS" --out "$RUN/data" --squad "$SQUAD" --eval-only
step stage1 "prepare" "$RUN/reader-s1" "$RUN/reader-s1/model/manifest.json" "${CLI[@]}" train-reader \
    --config configs/reader_squad_minilm_stage1.py --train "$RUN/squad/train.biencoder.json" \
    --dev "$RUN/squad/dev.biencoder.json" --workdir "$RUN/reader-s1" ${S1_INIT[@]+"${S1_INIT[@]}"} \
    ${S1[@]+"${S1[@]}"}
DEV=$RUN/data/dev.results.json.xz
E=$RUN/eval
read_step() { # read_step NAME "READS" MODEL RESULTS FORMAT KS
    step "read_$1" "$2" "$E/$1.json" "$E/$1.json.config.json" "${CLI[@]}" read --model "$3" \
        --results "$4" --format "$5" --ks "$6" --quiet --out "$E/$1.json"
}
# stage 1's reads before stage 2 trains (an hour on a CPU): its figures come first. It read one
# passage per question in training and never learned to choose among several (its selection
# head is untrained), so end to end it reads the retriever's top passage alone (k = 1)
read_step s1_gold_all "stage1 prepare" "$RUN/reader-s1/model" "$RUN/squad/dev.biencoder.json" biencoder 1
read_step s1_retrieved "stage1 sample" "$RUN/reader-s1/model" "$DEV" auto 1
step stage2 "prepare sample stage1" "$RUN/reader-s2" "$RUN/reader-s2/model/manifest.json" env READER_STAGE1="$RUN/reader-s1" \
    "${CLI[@]}" train-reader --config configs/reader_squad_minilm_stage2.py \
    --train "$RUN/squad/train.biencoder.json" --dev "$DEV" --workdir "$RUN/reader-s2" \
    ${S2[@]+"${S2[@]}"}
read_step s2_retrieved "stage2 sample" "$RUN/reader-s2/model" "$DEV" auto 1,5,20
read_step s2_gold1000 "stage2 sample" "$RUN/reader-s2/model" "$RUN/data/dev.biencoder.json.xz" biencoder 1
read_step s2_paragraphs "stage2 sample" "$RUN/reader-s2/model" "$RUN/data/dev.paragraphs.json.xz" squad 1
read_step s2_gold_all "stage2 prepare" "$RUN/reader-s2/model" "$RUN/squad/dev.biencoder.json" biencoder 1

summary() { # the reads' metrics as a markdown table
    "$PY" - "$E" <<'PY'
import json, math, sys
from pathlib import Path

rows = [("s2_retrieved", "stage 2, the sampled questions' retrieved passages (hybrid linear)"),
        ("s2_gold1000", "stage 2, the sampled questions' gold passages"),
        ("s2_paragraphs", "stage 2, the sampled questions' SQuAD paragraphs"),
        ("s2_gold_all", "stage 2, every held-out question's gold passage"),
        ("s1_gold_all", "stage 1, every held-out question's gold passage"),
        ("s1_retrieved", "stage 1, the sampled questions' retrieved top passage (hybrid linear)")]
print("| reading | k | questions | EM | F1 | EM 95% interval |\n|---|---:|---:|---:|---:|---|")
for name, what in rows:
    metrics = json.loads((Path(sys.argv[1]) / f"{name}.json.config.json").read_text())["metrics"]
    for k, m in sorted(metrics.items(), key=lambda km: int(km[0])):
        n, em = m["questions"], m["em"]
        half = 1.96 * math.sqrt(em * (1 - em) / n)  # README's: 1.96 sqrt(p (1 - p) / n)
        low, high = max(0.0, em - half), min(1.0, em + half)
        print(f"| {what} | {k} | {n:,} | {100 * em:.1f} | {100 * m['f1']:.1f} | "
              f"[{100 * low:.1f}, {100 * high:.1f}] |")
PY
}
if ! summary >"$E/summary.md.partial"; then
    echo "[$(now)] summary: failed (above)" | tee -a "$LOG" >&2
    exit 1
fi
mv "$E/summary.md.partial" "$E/summary.md"
cat "$E/summary.md"
echo "[$(now)] summary: $E/summary.md" | tee -a "$LOG"
