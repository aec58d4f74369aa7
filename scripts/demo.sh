#!/usr/bin/env bash
# The main job on the embedded default, end to end on a CPU machine:
#   1. set up .venv (scripts/setup.sh)
#   2. `dataflow run`: the rollout lets SmolLM2-135M-Instruct write 180 prompts of its own (Magpie) and two
#      sampled replies (T 0.7) to those and to the bundled conversations (the first 128 before any feature: the
#      draft vocabulary is counted from the target's own replies) and streams their EAGLE3 features (bf16 where
#      the CPU has native bf16; kept in a files store, so the trainer's later epochs replay them without
#      re-running the target); the trainer, at a lower CPU priority, trains the draft on what arrives
#   3. `dataflow eval`: speculative decoding of held-out prompts (16 conversation rows spread through the dataset,
#      which no rollout trains on) with the trained draft and with an untrained one; τ = mean accepted
#      length with K draft tokens
# Measured: 15m19s on 2 cores with .venv set up (set-up adds ~2 min), 916 samples, tau 1.48 in HF and vLLM.
# With --batch-tokens 1024 (2026-12-07, on a machine whose bf16 matmuls ran at half that stop's speed): 33m30s,
# tau 1.49 in HF and vLLM -- the same within 8 prompts.
# With the draft started from the target (--draft-init target, the default now; same slow machine): 31m22s,
# tau 1.57 in HF and vLLM, per position 0.35 / 0.13 / 0.05 / 0.03 / 0.01 (8 prompts: +0.08 is near their noise).
# SELF_PROMPTS=300 (1,156 samples): 20m54s, tau 1.60 -- over the 20 minutes. Stop 21's demo (250 prompts, one
# greedy reply each, 6 epochs, before the target wrote 2x faster): 16m22s, tau 1.47. Epochs matter more than
# samples at this size: 400 prompts and 3 epochs took as long as 250 and 6, for tau 1.34.
# Override with the variables below; scripts/quality.sh is the longer run.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${SKIP_SETUP:-}" ] || bash scripts/setup.sh   # SKIP_SETUP=1: .venv is set up already

RUN_DIR=${RUN_DIR:-runs/demo}
SAMPLES=${SAMPLES:-}        # bundled training rows (empty: all 278; 16 rows spread through it are held out)
SELF_PROMPTS=${SELF_PROMPTS:-180}   # prompts the target writes itself (Magpie): more on-policy text than 278 rows
SAMPLES_PER_PROMPT=${SAMPLES_PER_PROMPT:-2}  # sampled replies per prompt
TEMPERATURE=${TEMPERATURE:-0.7}
EPOCHS=${EPOCHS:-5}
DRAFT_INIT=${DRAFT_INIT:-target}           # the draft starts from the target's last layer and head (or: random)
VOCAB=${VOCAB:-8192}        # 4096 saves ~27% of the draft's FLOPs but holds ~5% fewer of the tokens it meets
K=${K:-5}
TTT=${TTT:-$K}              # training-time-test steps: the K draft positions the eval measures
BATCH_TOKENS=${BATCH_TOKENS:-1024}  # tokens per optimiser step: twice the steps of 2048 per epoch, as fast per
                                    # epoch; on one run's features (tune_on_features, 3 epochs) held-out tau-hat
                                    # 1.62 against 1.57
ROLLOUT_THREADS=${ROLLOUT_THREADS:-2}  # the target's torch threads; the trainer keeps torch's default (2)
mkdir -p "$RUN_DIR"
export HF_HUB_OFFLINE=1

.venv/bin/dataflow run --db "$RUN_DIR/run.sqlite" ${SAMPLES:+--num-samples "$SAMPLES"} \
    --regenerate --temperature "$TEMPERATURE" --samples-per-prompt "$SAMPLES_PER_PROMPT" --vocab-warmup 128 \
    --self-prompts "$SELF_PROMPTS" --max-new-tokens 128 --max-length 512 \
    --draft-vocab-size "$VOCAB" \
    --store files --store-dir "$RUN_DIR/features" --train-epochs "$EPOCHS" \
    --rollout-threads "$ROLLOUT_THREADS" --tasks-per-lease 64 --lr 1e-3 --warmup-steps 20 --draft-init "$DRAFT_INIT" --batch-tokens "$BATCH_TOKENS" --ttt-length "$TTT" --log-every 5 --save-every 100

.venv/bin/dataflow eval --draft "$RUN_DIR/run.train/final" --num-prompts 8 --num-draft-tokens "$K" \
    --max-new-tokens 64 --json | tee "$RUN_DIR/eval.json"
# The same draft judged by vLLM's own spec-decode counters, when the vllm extra is installed.
if .venv/bin/python -c "import vllm" 2>/dev/null; then
  .venv/bin/dataflow eval --engine vllm --draft "$RUN_DIR/run.train/final" --num-prompts 8 --num-draft-tokens "$K" \
      --max-new-tokens 64 --json | tee "$RUN_DIR/eval_vllm.json"
fi
echo "checkpoint: $RUN_DIR/run.train/final (loads in SGLang/vLLM as an EAGLE3 draft; see README)"
.venv/bin/python - "$RUN_DIR/eval.json" "$RUN_DIR/eval_vllm.json" <<'PY'
import json, os, sys
r = json.load(open(sys.argv[1]))
print(f"acceptance length tau = {r['tau']:.2f} with the trained draft, {r['tau_untrained']:.2f} untrained "
      f"(K = {r['num_draft_tokens']}, held-out prompts); output identical to greedy decoding: {r['exact_match']}")
if os.path.exists(sys.argv[2]):
    v = json.load(open(sys.argv[2]))
    print(f"measured by vLLM: tau = {v['tau']:.2f}, per-position acceptance "
          f"{' / '.join(f'{a:.2f}' for a in v['accept_rate_per_position'])}; output identical to vLLM's greedy: "
          f"{v['exact_match']}")
PY
