#!/usr/bin/env bash
# The command-line round trip on whatever accelerator this machine has (the GPU check's second half; the first is
# benchmarks/gpu.py): train each tiny recipe, sample it, turn ar-tiny into a Gen-PPL judge and evaluate elf-tiny
# with it, then train elf-tiny under FSDP2 (recipes/accelerate/fsdp.yaml, NCCL on CUDA) and sample that run.
#
#   bash benchmarks/gpu_cli.sh runs/gpu-cli            # STEPS=20 for a smoke run on a CPU
set -euo pipefail
out=${1:-runs/gpu-cli}
steps=${STEPS:-300}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
single=(--set 'stages=[]' --set "train.steps=$steps" --set "train.save_every=$steps")

cdlm train --recipe ar-tiny -o "$out/ar" --set "train.steps=$steps" --set "train.save_every=$steps"
cdlm convert "$out/ar" "$out/judge" --to hf-causal-lm
cdlm train --recipe elf-tiny -o "$out/elf" "${single[@]}"
cdlm sample --checkpoint "$out/elf" --num-samples 2
cdlm eval --checkpoint "$out/elf" --judge "$out/judge" --steps 8,16 --num-samples 16 -o "$out/elf-eval"
cdlm train --recipe cola-tiny -o "$out/cola" --set "train.steps=$steps" --set "train.save_every=$steps"
cdlm sample --checkpoint "$out/cola" --prompt "The return value" --max-new-tokens 8
accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 1 -m cdlm.cli train --recipe elf-tiny \
  -o "$out/elf-fsdp" "${single[@]}"
cdlm sample --checkpoint "$out/elf-fsdp" --num-samples 2
echo "gpu_cli: every command succeeded"
