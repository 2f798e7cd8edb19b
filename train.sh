#!/usr/bin/env bash
# The paper's runs (He et al. 2026, Tables 1-3) as torchrun commands.
#
#   bash train.sh multi-8step                     # one node of 8 GPUs
#   NODES=4 MASTER_ADDR=10.0.0.1 bash train.sh multi-8step   # the same line on each of 4 nodes (c10d rendezvous)
#   bash train.sh hps-8step --lr=5e-6                  # extra --field=value overrides
#
# First, once, with internet: bash train.sh RUN --fetch (FLUX.1-dev's folders, the rewards and judges, HPDv2's
# prompts, into the Hugging Face cache; --fetch=plan lists them); then a run may set HF_HUB_OFFLINE=1.
#
# The paper trains one prompt group per GPU on 32 GPUs (Table 1; 16 for the ablations), so each iteration
# averages 32 groups. With fewer GPUs each rank takes several groups (--groups_per_rank) to keep that batch:
# the same update, proportionally more seconds per iteration.
#
# torchrun restarts every worker after a rank dies or hangs (MAX_RESTARTS, default 3); the same command then
# continues from the latest checkpoint by itself (docs/cluster.md). A rerun of this script needs --resume.
set -euo pipefail
RUN=${1:?usage: bash train.sh RUN [--field=value ...]; RUN is one of the cases below}
shift
NODES=${NODES:-1}
GPUS=${GPUS:-8}

case "$RUN" in
  multi-8step)   ARGS=() ;;                                        # Table 1: DPM++ 8 steps, NFE_theta 1.33 (default)
  multi-16step)  ARGS=(--num_steps=16 --num_train_steps=9) ;;       # Table 1/3: DPM++ 16 steps, B=4, K=9, NFE_theta 3
  multi-25step)  ARGS=(--rollout_solver=euler --num_steps=25 --num_anchors=12 --num_train_steps=4) ;;  # DDIM 25, NFE_theta 4
  hps-8step)     ARGS=(--rewards=hpsv2) ;;                         # Table 2: HPSv2.1 only, p = 0.8
  hps-8step-p2)  ARGS=(--rewards=hpsv2 --adv_p=2) ;;               # Table 2/6: standard GRPO normalisation
  hpsv3-8step)   ARGS=(--rewards=hpsv3) ;;                         # HPSv3 alone (Pref-GRPO's reward); 44.8 GiB a rank
  ablation-base) ARGS=(--rewards=hpsv2 --noise_sigma=0.5 --adv_p=2) ;;  # Tables 4-6 start from (sigma, B, p) = (0.5, 4, 2)
  dancegrpo)     ARGS=(); SCRIPT=sde_grpo.py ;;                    # Table 3's SDE baseline: 25 steps, all 12 samples, K=14
  lora-1gpu)     ARGS=(--preset=flux-dev-lora); GPUS=1; BATCH=${BATCH:-8} ;;  # LoRA r=64 on one GPU; BATCH=32 = paper's batch, 4x slower
  qlora-24gb)    ARGS=(--preset=flux-dev-24gb); GPUS=1; BATCH=${BATCH:-8} ;;  # LoRA r=64 on a 4-bit base: one 24 GB GPU
  sd35-medium)   ARGS=(--preset=sd3.5-medium) ;;                  # SD3.5 Medium, Flow-GRPO's 512² 10 steps CFG 4.5, full FT
  sd35-lora)     ARGS=(--preset=sd3.5-medium-lora); GPUS=1; BATCH=${BATCH:-8} ;;  # SD3.5 Medium, LoRA r=32, one GPU
  qwen-image-lora) ARGS=(--preset=qwen-image-lora); GPUS=1; BATCH=${BATCH:-8} ;;  # Qwen-Image, LoRA r=64, one 80 GB GPU
  *) echo "unknown run '$RUN'"; exit 2 ;;
esac
if [[ " $* " == *" --fetch"* ]]; then  # the downloads of this run, in one process (neighbor_grpo.py --fetch)
  exec python "${SCRIPT:-neighbor_grpo.py}" --preset=flux-dev "${ARGS[@]}" "$@"
fi
BATCH=${BATCH:-32}  # prompt groups per iteration (paper: 32; ablations: 16)
GROUPS_PER_RANK=$(( BATCH / (NODES * GPUS) ))
(( GROUPS_PER_RANK >= 1 )) || { echo "BATCH=$BATCH is smaller than NODES*GPUS=$((NODES * GPUS))"; exit 2; }

RESTARTS=(--max_restarts="${MAX_RESTARTS:-3}")
# a new TCPStore for each restart: a shared one keeps the dead round's keys, and across nodes the restart counts that
# could tell the rounds apart differ (docs/cluster.md)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
if (( NODES > 1 )); then  # c10d rendezvous (torchrun's docs): the node at MASTER_ADDR hosts it, ranks by arrival
  LAUNCH=(torchrun --nnodes="$NODES" --nproc_per_node="$GPUS" --rdzv_backend=c10d
          --rdzv_endpoint="${MASTER_ADDR:?}:${MASTER_PORT:-29500}" --rdzv_id="${RDZV_ID:-$RUN}" "${RESTARTS[@]}")
else
  LAUNCH=(torchrun --standalone --nproc_per_node="$GPUS" "${RESTARTS[@]}")
fi
exec "${LAUNCH[@]}" "${SCRIPT:-neighbor_grpo.py}" --preset=flux-dev --groups_per_rank="$GROUPS_PER_RANK" \
  --out_dir="runs/$RUN" "${ARGS[@]}" "$@"
