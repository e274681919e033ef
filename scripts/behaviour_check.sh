#!/usr/bin/env bash
# Does a change keep charrnn's behaviour? Trains the same four small models with two trees
# and compares them, then samples and scores the first tree's models with both.
#
#   git worktree add /tmp/before <commit>
#   bash scripts/behaviour_check.sh /tmp/before .      # OLD_TREE NEW_TREE [WORK_DIR]
#
# Prints, per model, whether the weights, the start mix's weights, metrics.jsonl's losses and
# samples.jsonl's texts are identical, and a diff of every sample and eval output (md5s and
# eval's JSON) between the two trees; the last line says SAME or DIFFERENT. Uses the first
# 90 kB of ../shared/data/tinyshakespeare.txt and the whole of it; CPU, fp32 where the CPU
# has no bf16 (~1 minute).
set -euo pipefail
old=$(cd "$1" && pwd)
new=$(cd "$2" && pwd)
work=${3:-$(mktemp -d)}
py=${PYTHON:-$new/.venv/bin/python}
text=$(cd "$(dirname "$0")/../.." && pwd)/shared/data/tinyshakespeare.txt
mkdir -p "$work"
cd "$work"
head -c 90000 "$text" > small.txt
tail -c 20000 "$text" > held.txt

train() {  # TREE OUT
    for mix in --start-mix --no-start-mix; do
        PYTHONPATH=$1 "$py" -m charrnn train small.txt --hidden-size 32 --steps 60 --eval-every 30 --seed 3 \
            --device cpu -q "$mix" -o "$2/small$mix" 2>/dev/null
        PYTHONPATH=$1 "$py" -m charrnn train "$text" --hidden-size 128 --steps 20 --eval-every 20 \
            --device cpu -q "$mix" -o "$2/full$mix" 2>/dev/null
    done
}

outputs() {  # TREE: sample and eval every model the old tree trained
    for m in old/*; do
        c=(env PYTHONPATH="$1" "$py" -m charrnn)
        "${c[@]}" sample -m "$m" --prime "ROMEO:" --seed 7 -n 200 -T 0.8 --device cpu 2>/dev/null | md5sum
        "${c[@]}" sample -m "$m" --seed 11 -n 200 -T 1.0 --device cpu 2>/dev/null | md5sum
        "${c[@]}" sample -m "$m" --prime "KING" --seed 5 -n 100 -s 8 --top-p 0.9 --json --device cpu 2>/dev/null | md5sum
        "${c[@]}" sample -m "$m" --prime "First" --seed 5 -n 100 -T 0 --device cpu 2>/dev/null | md5sum
        "${c[@]}" eval held.txt -m "$m" --json --unknown skip --device cpu 2>/dev/null | sed 's/"checkpoint": "[^"]*"//'
        "${c[@]}" eval held.txt -m "$m" --json --streams 1 --unknown skip --device cpu 2>/dev/null | sed 's/"checkpoint": "[^"]*"//'
    done
}

rm -rf old new
train "$old" old
train "$new" new
PYTHONPATH=$new "$py" - <<'PY'
import json, pathlib, torch
for run in sorted(pathlib.Path("old").iterdir()):
    a = torch.load(run / "best.pt", weights_only=True)
    b = torch.load(pathlib.Path("new") / run.name / "best.pt", weights_only=True)
    weights = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    mix = (a.get("start_mix") is None) == (b.get("start_mix") is None) and (
        a.get("start_mix") is None or torch.equal(a["start_mix"]["weights"], b["start_mix"]["weights"]))
    def losses(d): return [(r["step"], r["val_loss"], r["train_loss"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
    metrics = losses(run) == losses(pathlib.Path("new") / run.name)
    samples = (run / "samples.jsonl").read_text() == (pathlib.Path("new") / run.name / "samples.jsonl").read_text()
    print(f"{run.name}: weights {'same' if weights else 'DIFFERENT'}, start mix {'same' if mix else 'DIFFERENT'}, "
          f"metrics {'same' if metrics else 'DIFFERENT'}, samples {'same' if samples else 'DIFFERENT'}")
PY
outputs "$old" > outputs-old.txt
outputs "$new" > outputs-new.txt
if diff outputs-old.txt outputs-new.txt; then
    echo "sample and eval outputs: SAME ($(wc -l < outputs-old.txt) lines)"
else
    echo "sample and eval outputs: DIFFERENT"
fi
