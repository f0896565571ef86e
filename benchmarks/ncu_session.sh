#!/usr/bin/env bash
# Nsight Compute profiles of the gs1 decode kernels at the issue-3/5 target point (one GPU
# call): where the time goes (warp stalls, occupancy, throughput). Reports land in $OUT.
#   OUT=/tmp/ncu bash benchmarks/ncu_session.sh       # the fp16 and 4-bit defaults
#   OUT=/tmp/ncu bash benchmarks/ncu_session.sh q4    # 4 bits: word-wise PTX against Triton's unpack
#   OUT=/tmp/ncu bash benchmarks/ncu_session.sh now   # the library defaults of the gs1 kernels, with the mask
#   OUT=/tmp/ncu bash benchmarks/ncu_session.sh rope  # the Gluon RoPE kernel (fp16, 4-bit), with the mask
set -u
export PYTHONPATH=.
S="--section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis"
prof() { name=$1; kern=$2; shift 2
  echo "=== $name"
  timeout 150 ncu --clock-control none --kernel-name regex:$kern --launch-skip 3 --launch-count 1 $S python benchmarks/ncu_kernel.py "$@" > $OUT/ncu_$name.txt 2>&1
  echo "rc $?"
  grep -E "Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Achieved Occupancy|Theoretical Occupancy|Registers Per|Shared Memory Config|Block Limit|Warp Cycles Per Issued|No Eligible|Issued Warp|One or More|Executed Ipc|L1/TEX Hit|L2 Hit|Waves Per SM|Grid Size" $OUT/ncu_$name.txt | head -30
  grep -A3 -i "stall\|warp state" $OUT/ncu_$name.txt | grep -i "cycles\|stall" | head -12
}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
if [ "${1:-}" = now ]; then
  prof rope_default_mask per_head --rope --mask
  prof rope_q4_default_mask per_head --rope --mask --bits 4
  prof absorbed_q4_default_mask per_head --mask --bits 4
  exit 0
fi
if [ "${1:-}" = rope ]; then
  prof rope_gluon rope_decode --rope --mask
  prof rope_gluon_q4 rope_decode --rope --mask --bits 4
  exit 0
fi
if [ "${1:-}" = q4 ]; then
  prof absorbed_q4_words per_head --bits 4
  prof absorbed_q4_triton per_head --bits 4 --triton-unpack
  prof rope_q4_words_mask per_head --rope --mask --bits 4
  prof rope_ph1_mask per_head --rope --mask --group-heads 1 --programs-per-sm 8
  exit 0
fi
prof rope_ph1_mask per_head --rope --mask --group-heads 1 --programs-per-sm 8
prof rope_group_mask rebuild --rope --mask
prof absorbed_fp16 absorbed
prof absorbed_q4 per_head --bits 4
