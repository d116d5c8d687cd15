#!/usr/bin/env bash
# The tiny LLaDA2 (configs/llada2_tiny.yaml) fine-tuned, unlearned with MDU and evaluated twice on the same rows:
# as LLaDA2 is trained and sampled (data.layout=block, 32-token blocks, eval.sampler=block) and with full
# bidirectional attention (data.layout=full, model.block_size=0, LLaDA's low_confidence sampler).
# Writes OUT/{block,full}/{ft,mdu,eval-ft,eval-mdu} and OUT/table.md. docs/block_diffusion.md has the figures.
#
#   tools/block_layout_study.sh [OUT=runs/block_study] [EPOCHS=150] [UNLEARN_EPOCHS=50] [ROWS=16]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/block_study}
EPOCHS=${EPOCHS:-150}
UNLEARN_EPOCHS=${UNLEARN_EPOCHS:-50}
ROWS=${ROWS:-16}
PY=${PY:-.venv/bin/python}
CLI=("$PY" -m mdu_dist.cli)
mkdir -p "$OUT"
# The fine-tune sees the forget rows and the retain rows it is later evaluated on (TOFU's *_perturbed splits).
"$PY" - "$OUT" "$ROWS" <<'EOF'
import json, sys
from pathlib import Path
from mdu_dist.data import load_pairs
out, rows = Path(sys.argv[1]), int(sys.argv[2])
pairs = [{"question": q.question, "answer": q.answer} for split in ("forget10_perturbed", "retain_perturbed")
         for q in load_pairs(split, "", limit=rows)]
(out / "finetune.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
EOF
COMMON=(--config configs/llada2_tiny.yaml optim.micro_batch_size=8 train.progress=false
        eval.forget=forget10_perturbed eval.retain=retain_perturbed)
declare -A LAYOUT=(
    [block]="data.layout=block model.block_size=32 eval.sampler=block"
    [full]="data.layout=full model.block_size=0 eval.sampler=low_confidence eval.block_length=32 eval.steps=64"
)
for name in block full; do
    run=$OUT/$name
    read -r -a keys <<< "${LAYOUT[$name]}"
    "${CLI[@]}" finetune "${COMMON[@]}" "${keys[@]}" data.finetune="$OUT/finetune.jsonl" data.pad_in_response=true \
        optim.lr=1e-3 optim.warmup_ratio=0.1 train.epochs="$EPOCHS" train.output_dir="$run/ft"
    ft=$(ls -d "$run"/ft/checkpoints/step-* | sort -t- -k2 -n | tail -1)/model
    "${CLI[@]}" unlearn "${COMMON[@]}" "${keys[@]}" train.init="$ft" method.name=mdu method.tau=0.5 data.limit="$ROWS" \
        data.forget=forget10 data.retain=retain_perturbed optim.lr=1e-4 optim.warmup_ratio=0.1 \
        train.epochs="$UNLEARN_EPOCHS" train.output_dir="$run/mdu"
    for model in ft mdu; do
        "${CLI[@]}" eval "${COMMON[@]}" "${keys[@]}" eval.checkpoint="$run/$model" eval.limit="$ROWS" \
            eval.splits=[forget,retain] eval.num_samples=8 eval.gen_length=64 eval.output_dir="$run/eval-$model"
    done
done
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
keys = ["forget_Q_A_ROUGE", "forget_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Q_A_Prob"]
lines = ["| layout | model | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
for name in ("block", "full"):
    for model in ("ft", "mdu"):
        m = json.loads((out / name / f"eval-{model}" / "eval.json").read_text())["metrics"]
        lines.append(f"| {name} | {model} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |")
(out / "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
