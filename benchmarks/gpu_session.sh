#!/usr/bin/env bash
# The GPU measurements still owed by issues 3, 4 and 5, in two device calls of < 10 minutes
# each (logs land in $OUT; the device tool copies them back):
#   bash benchmarks/gpu_session.sh 1   # end-to-end check + issue-4 decode (8 layers, profiled)
#   bash benchmarks/gpu_session.sh 2   # issue-3/5 kernel table at the target point (cuDNN baseline)
#   bash benchmarks/gpu_session.sh 3   # gs1 kernel rows with the in-model diag; decode with and without CUDA graphs
#   bash benchmarks/gpu_session.sh 6   # prefetch A/B at the target point, with the GPU checks
#   bash benchmarks/gpu_session.sh 7   # 8-layer decode: gs1 group vs per-head kernel, and 4 bits
#   bash benchmarks/gpu_session.sh 8   # word-wise 4-bit dequantization: GPU tests, kernel A/B
#   bash benchmarks/gpu_session.sh 9   # 32-layer decode at 4 bits (CUDA graphs)
#   bash benchmarks/gpu_session.sh 10  # 32-layer decode, palu fp16 and 4-bit latents (CUDA graphs)
#   bash benchmarks/gpu_session.sh 11  # --wide occupancy sweep of the 4-bit gs1 rows
#   bash benchmarks/gpu_session.sh 12  # the issue-4 pair on one machine: Inductor, then palu (32 layers)
#   bash benchmarks/gpu_session.sh 13  # GPU tests and checks of the word-wise dequantization (fp16, bf16)
#   bash benchmarks/gpu_session.sh 14  # --wide sweep of the fp16 gs1 rows (split counts of the RoPE default)
#   bash benchmarks/gpu_session.sh 15  # split counts of the gs1 fp16 kernels, interleaved rounds
#   bash benchmarks/gpu_session.sh 16  # split counts with the wave-filling default, then the 32-layer decodes
#   bash benchmarks/gpu_session.sh 17  # kernel A/B: merged heads, stages; the previous code from .ab/old (carried)
#   bash benchmarks/gpu_session.sh 18  # 4-bit absorbed candidates, then the issue-4 pair (32 layers) on one machine
#   bash benchmarks/gpu_session.sh 19  # RoPE 128-token tiles; the issue-4 pair again and the 4-bit decode
#   bash benchmarks/gpu_session.sh 20  # the issue-3 table (B 1/8/32 x 4k/32k/128k x gs 1/2/4, both shapes), defaults only
#   bash benchmarks/gpu_session.sh 21  # without a mask: this code against .ab/old (carried), interleaved processes
#   bash benchmarks/gpu_session.sh 22  # prefill: which SDPA backends take unpadded latent values, then the prefill table
#   bash benchmarks/gpu_session.sh 23  # the Gluon 4-bit absorbed kernel: GPU tests, then A/B of its knobs against the Triton default
#   bash benchmarks/gpu_session.sh 24  # Gluon GPU tests (GQA too) and the quantized GPU tests, then the 4-bit rows of the issue table
#   bash benchmarks/gpu_session.sh 25  # which knob breaks the 2-bit MQA fp16 absorbed case; Gluon tests; the 4-bit table rows
#   bash benchmarks/gpu_session.sh 26  # the 2-bit diag again; 4-bit absorbed A/B with and without the decode mask
#   bash benchmarks/gpu_session.sh 27  # kernel GPU tests; 4-bit absorbed A/B with and without the mask; the 4-bit table rows
#   bash benchmarks/gpu_session.sh 28  # Gluon tests with rank 256; the 4-bit rows at the target point, gs 1/2/4
#   bash benchmarks/gpu_session.sh 29  # Gluon tests with bf16; the bf16 4-bit rows at the target point
#   bash benchmarks/gpu_session.sh 30  # the Gluon RoPE kernel: GPU tests, A/B against the Triton kernels, the RoPE rows
#   bash benchmarks/gpu_session.sh 31  # Gluon RoPE: cos/sin from global memory and a register cap (3 programs per SM), A/B
#   bash benchmarks/gpu_session.sh 32  # Gluon RoPE: Nsight Compute profiles, then copy stages A/B
#   bash benchmarks/gpu_session.sh 33  # Gluon RoPE: cos/sin copies through L1 (.ca) or not, alternating processes
#   bash benchmarks/gpu_session.sh 34  # Gluon RoPE with one softmax lane per thread: tests, A/B of heads per program
#   bash benchmarks/gpu_session.sh 35  # Gluon RoPE: tests again; A/B of 2 heads per program with cos/sin from global memory
#   bash benchmarks/gpu_session.sh 36  # Gluon RoPE: tests; A/B of the cos/sin modes with 2 heads per program (fp16 and 4-bit)
#   bash benchmarks/gpu_session.sh 37  # Gluon RoPE defaults: tests, the gs1 rows of the issue table (B 1/8/32 x 4k/32k/128k), bf16
#   bash benchmarks/gpu_session.sh 38  # after review: Gluon RoPE tests, the MHA smoke in a model, the kernels' GPU tests, A/B
#   bash benchmarks/gpu_session.sh 39  # Gluon RoPE, 4-bit values summed as fp16 pairs: tests, A/B
#   bash benchmarks/gpu_session.sh 40  # Gluon RoPE at gs2 (two heads per latent group): tests, A/B of its knobs, the gs2 rows
#   bash benchmarks/gpu_session.sh 41  # Gluon RoPE at gs2, two heads on one latent tile: tests, A/B (gs2 and gs1), the gs2 rows
#   bash benchmarks/gpu_session.sh 42  # after review: Gluon RoPE tests, kernels' GPU tests, MHA smoke (gs1/gs2) in a model, A/B
#   bash benchmarks/gpu_session.sh 43  # gs2 pair: three-slot ring, static slots (this code) against dynamic (.ab/ring3a)
#                                      # and values in one buffer (.ab/old), carried; tests
#   bash benchmarks/gpu_session.sh 44  # the kept ring (dynamic slots): tests, MHA smoke, A/B against Triton, the gs2 rows
#   bash benchmarks/gpu_session.sh 45  # after review: Gluon RoPE tests (two more three-slot-ring cases), gs2 A/B
#   bash benchmarks/gpu_session.sh 46  # gs1 at rank ratio 1.0 (rank 128): cos/sin in one copy buffer (new default) or per stage
#   bash benchmarks/gpu_session.sh 47  # the B=32 x 128k gs2 rows with 4-bit latents (quantize_packed in place: they ran out of memory)
#   bash benchmarks/gpu_session.sh 48  # values rebuilt by the op where rank_v > head dim (lv): kernel GPU tests, model
#                                      # smoke (gs "all" takes lv), the prefill table
#   bash benchmarks/gpu_session.sh 49  # decode rows with lv (gs4, B=8 x 32k); the B=32 x 128k 4-bit rows, with what the
#                                      # GPU holds between rows
#   bash benchmarks/gpu_session.sh 50  # after 48: lv GPU tests, the smoke again (symbolic layout fix), the prefill table
#                                      # (old key-rebuild grid, broadcast value copy), then 49's rows
#   bash benchmarks/gpu_session.sh 51  # per-head rebuild for large groups: prefill GPU tests, the prefill table, the
#                                      # B=32 x 128k rows with 4-bit latents quantized in token slices (gs 1/2/4)
#   bash benchmarks/gpu_session.sh 52  # lv applied per KV head (bmm): its time against a broadcast matmul, the gs4 rows
#   bash benchmarks/gpu_session.sh 53  # the gs4 rows of the issue table with lv (B 1/8/32 x 4k/32k/128k, both shapes, 4 bits)
#   bash benchmarks/gpu_session.sh 57  # 4k prefill parts: value copy / rebuild candidates (cuBLAS into BSHD), SDPA layouts
#   bash benchmarks/gpu_session.sh 58  # the key/value rebuild kernel: tile, warps, stages, per group or per head (4k, 16k)
#   bash benchmarks/gpu_session.sh 59  # values by cuBLAS, 128-token key tiles; Gluon 4-bit over 16 heads per group:
#                                      # GPU tests, the prefill table (block columns), the GQA gs4 4-bit rows
#   bash benchmarks/gpu_session.sh 60  # the value product on a side stream beside the key kernel: tests (graph replay),
#                                      # its A/B in prefill_parts_probe, the prefill table
#   bash benchmarks/gpu_session.sh 61  # 32-layer decode (CUDA graphs) at gs4 (lv), gs4 4-bit, gs1 and Inductor; MHA smoke
#   bash benchmarks/gpu_session.sh 62  # final: the kernels' GPU tests in full (four files)
#   bash benchmarks/gpu_session.sh 54  # final: the latent-attention and quantized kernels' GPU tests in full, the MHA smoke
#   bash benchmarks/gpu_session.sh 55  # where gs2 prefill time goes with 32 KV heads (4k, 16k), flash against cuDNN
#   bash benchmarks/gpu_session.sh 56  # values replicated per KV head by a Triton kernel: GPU tests, the gs2 breakdown,
#                                      # the prefill table
#   bash benchmarks/gpu_session.sh 63  # the op's output in [B, S, H, D] memory: prefill GPU tests, the smoke, the prefill
#                                      # table (with "before"), compiled 4-layer prefill of 4k (Inductor, gs1, gs4)
#   bash benchmarks/gpu_session.sh 64  # kernel GPU tests, the Gluon ones included
#   bash benchmarks/gpu_session.sh 65  # gs2 prefill: latent values copied in the key kernel's launch (tests, probe A/B,
#                                      # the prefill table, the smoke)
#   bash benchmarks/gpu_session.sh 66  # the final code: kernel GPU tests (Gluon included), the smoke
#   bash benchmarks/gpu_session.sh 67  # the Gluon GQA RoPE kernel: its GPU tests, the GQA smoke, A/B against the Triton
#                                      # kernels (Llama-3-8B shape), the GQA gs1 rows of the issue table
#   bash benchmarks/gpu_session.sh 68  # the same after RoPE in fp16 pairs and 32-bit copy offsets (560 -> 376 SASS
#                                      # instructions per tile); the previous commit's kernel from .ab/old (carried)
#   bash benchmarks/gpu_session.sh 69  # the same with the mask row loaded a tile ahead, with and without the mask
#   bash benchmarks/gpu_session.sh 70  # Gluon GQA at gs2 (a program per KV head) and rank 128 (one cos/sin buffer):
#                                      # tests, the GQA smoke, A/B at gs1 (.ab/old carried) and gs2, the gs1/gs2 rows
#   bash benchmarks/gpu_session.sh 71  # Gluon GQA with 4-bit latents: tests, the GQA smoke, A/B against the Triton
#                                      # kernels (gs1, gs2), the 4-bit GQA rows at gs1/gs2
#   bash benchmarks/gpu_session.sh 72  # the kernels' GPU tests on GQA/MQA and RoPE cases; 32-layer Llama-3-8B-shaped
#                                      # decode (CUDA graphs, B=8 x 16k): Inductor, palu gs1
#   bash benchmarks/gpu_session.sh 73  # the same decode with the strong baseline: Inductor over query heads folded
#                                      # into the query length (no repeat_kv copies), then palu gs1
#   bash benchmarks/gpu_session.sh 74  # Gluon GQA: the key product overlapped with the table reads, the score product
#                                      # in two chains: tests, A/B against .ab/old and .ab/async (carried)
#   bash benchmarks/gpu_session.sh 75  # the Gluon kernel for wide groups (gs4, rank 256): tests, A/B against the Triton
#                                      # kernel and fp32 value sums, the gs4 RoPE rows (Llama-2-7B shape)
#   bash benchmarks/gpu_session.sh 76  # the same kernel unrolled by two (static stages: 3 barriers a tile instead of 10),
#                                      # row pointers for the copies: tests, A/B against .ab/old (75's, carried) and Triton
#   bash benchmarks/gpu_session.sh 77  # tests, then this code against .ab/old (carried) in alternating processes (run
#                                      # for the wide kernel's product split in Wa and Wb halves, since reverted)
#   bash benchmarks/gpu_session.sh 78  # the kept wide kernel (76's; pairs for bf16 too): tests, the MHA smoke (rank 256
#                                      # at "all"), the gs4 RoPE rows (fp16; bf16 at B=8 x 32k)
#   bash benchmarks/gpu_session.sh 79  # 32-layer decode (CUDA graphs, B=8 x 16k) at gs4: palu, then Inductor, one machine
#   bash benchmarks/gpu_session.sh 80  # the wide kernel at rank 128 (two programs per SM): tests, A/B against the Gluon
#                                      # RoPE kernel at gs2 (ratio 0.5) and gs1 (ratio 1.0)
#   bash benchmarks/gpu_session.sh 81  # rank 128 to the wide kernel by default: Gluon RoPE and wide tests, the MHA smoke,
#                                      # the gs2 RoPE rows (Llama-2-7B shape)
set -u
export PYTHONPATH=.
OUT=${OUT:-/tmp/palu_gpu}
mkdir -p "$OUT"
step() {  # name, time limit (s), command...
    local name=$1 limit=$2; shift 2
    echo "=== $name ($(date -u +%H:%M:%S))"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "rc $?" >> "$OUT/$name.log"
    grep -v -i warn "$OUT/$name.log" | grep -E "^\[|^\||rel err|smoke|speedup|ms/step|identical|diag|FAIL|Error|^rc|---|path|shape" | tail -40
}
case "${1:-1}" in
81)
    step gluon_tests 200 python -m pytest -q tests/kernels/test_gluon_wide.py tests/kernels/test_gluon_rope.py
    step smoke_mha 100 python -u benchmarks/gpu_smoke.py --mha
    step table_gs2 100 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --no-naive \
        --shapes mha --gs 2 --ctx 32k 128k --budget-s 80
    ;;
80)
    step wide_tests 200 python -m pytest -q tests/kernels/test_gluon_wide.py
    step ab_gs2 90 python -u benchmarks/kernel_ab.py --gs 2 --cases rope --rounds 5 \
        --variant rope:wide=gluon_wide_min_rank=128
    step ab_r128 90 python -u benchmarks/kernel_ab.py --gs 1 --rank-ratio 1.0 --cases rope --rounds 5 \
        --variant rope:wide=gluon_wide_min_rank=128
    ;;
78)
    step wide_tests 200 python -m pytest -q tests/kernels/test_gluon_wide.py
    step smoke_mha 120 python -u benchmarks/gpu_smoke.py --mha
    step table_wide 170 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --no-naive \
        --shapes mha --gs 4 --budget-s 150
    step table_wide_bf16 60 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --no-naive \
        --shapes mha --gs 4 --batch 8 --ctx 32k --bf16 --out "$OUT/bf16"
    ;;
79)
    for run in "gs4 palu 4" "inductor inductor 1"; do
        set -- $run
        name=$1 path=$2 gs=$3; shift 3
        step decode32_$name 150 python -u benchmarks/decode.py --layers 32 --batch 8 --context 16384 --steps 20 \
            --paths $path --modes reduce-overhead --group-size $gs "$@"
        grep -E "reduce-overhead|Llama" "$OUT/decode32_$name.log" | tail -2
    done
    ;;
77)
    step wide_tests 200 python -m pytest -q tests/kernels/test_gluon_wide.py
    for tag in new old new2 old2; do
        root=.; case $tag in old*) root=.ab/old ;; esac
        step ab_wide_$tag 60 env PYTHONPATH=$root python -u benchmarks/kernel_ab.py --gs 4 --cases rope --rounds 3 \
            --tag $tag
    done
    ;;
76)
    step wide_tests 200 python -m pytest -q tests/kernels/test_gluon_wide.py
    for tag in new old; do
        root=.; [ $tag != new ] && root=.ab/$tag
        step ab_wide_$tag 60 env PYTHONPATH=$root python -u benchmarks/kernel_ab.py --gs 4 --cases rope --rounds 5 \
            --tag $tag
    done
    step ab_wide_triton 60 python -u benchmarks/kernel_ab.py --gs 4 --cases rope --rounds 3 \
        --variant rope:triton=gluon=false
    ;;
75)
    step wide_tests 200 python -m pytest -q tests/kernels/test_gluon_wide.py
    step ab_wide 120 python -u benchmarks/kernel_ab.py --gs 4 --cases rope --rounds 5 \
        --variant rope:fp32sums=gluon_wide_pairs=false --variant rope:triton=gluon=false
    step table_wide 200 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --no-naive \
        --shapes mha --gs 4 --budget-s 170
    ;;
74)
    step gqa_tests 120 python -m pytest -q -x tests/kernels/test_gluon_gqa.py
    for tag in new async old; do
        root=.; [ $tag != new ] && root=.ab/$tag
        step ab_$tag 40 env PYTHONPATH=$root python -u benchmarks/kernel_ab.py --kv-heads 8 --cases rope rope4 \
            --rounds 5 --tag $tag
    done
    ;;
73)
    step decode32_llama3_folded 300 python -u benchmarks/decode.py --shape llama3 --layers 32 --batch 8 \
        --context 16384 --modes reduce-overhead --gqa-baseline folded
    grep -E "^inductor|^palu|speedup" "$OUT/decode32_llama3_folded.log"
    ;;
72)
    step kernel_tests 200 python -m pytest -q -x tests/kernels/test_latent_attention.py \
        tests/kernels/test_quant_latent_attention.py -k "gqa or mqa or rope"
    step decode32_llama3 300 python -u benchmarks/decode.py --shape llama3 --layers 32 --batch 8 --context 16384 \
        --modes reduce-overhead
    grep -E "^inductor|^palu|speedup" "$OUT/decode32_llama3.log"
    ;;
71)
    step gqa_tests 200 python -m pytest -q tests/kernels/test_gluon_gqa.py
    step smoke_gqa 80 python -u benchmarks/gpu_smoke.py
    step ab_gqa_q4 60 python -u benchmarks/kernel_ab.py --kv-heads 8 --cases rope4 --rounds 5 \
        --variant rope4:triton=gluon=false
    step ab_gqa_q4_gs2 60 python -u benchmarks/kernel_ab.py --kv-heads 8 --gs 2 --cases rope4 --rounds 5 \
        --variant rope4:triton=gluon=false
    step table_gqa_q4 200 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --no-naive \
        --shapes gqa --gs 1 2 --quant-bits 4 --quant-only --budget-s 170
    ;;
70)
    step gqa_tests 200 python -m pytest -q tests/kernels/test_gluon_gqa.py
    step smoke_gqa 80 python -u benchmarks/gpu_smoke.py
    step ab_gqa_gs1 60 python -u benchmarks/kernel_ab.py --kv-heads 8 --cases rope --rounds 5 --tag new
    step ab_gqa_gs1_old 60 env PYTHONPATH=.ab/old python -u benchmarks/kernel_ab.py --kv-heads 8 --cases rope \
        --rounds 5 --tag old
    step ab_gqa_gs2 90 python -u benchmarks/kernel_ab.py --kv-heads 8 --gs 2 --cases rope --rounds 5 \
        --variant rope:triton=gluon=false
    step ab_gqa_r128 90 python -u benchmarks/kernel_ab.py --kv-heads 8 --rank-ratio 1.0 --cases rope --rounds 5 \
        --variant rope:triton=gluon=false
    step table_gqa 200 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --no-naive \
        --shapes gqa --gs 1 2 --budget-s 170
    ;;
69)
    step gqa_tests 200 python -m pytest -q tests/kernels/test_gluon_gqa.py
    for m in "" --no-mask; do
        step ab_gqa_new$m 60 python -u benchmarks/kernel_ab.py --kv-heads 8 --cases rope --rounds 5 --tag new $m \
            --variant rope:triton=gluon=false --variant rope:3stages=gluon_rope_stages=3
        step ab_gqa_old$m 60 env PYTHONPATH=.ab/old python -u benchmarks/kernel_ab.py --kv-heads 8 --cases rope \
            --rounds 5 --tag old $m
    done
    ;;
68)
    step gqa_tests 200 python -m pytest -q tests/kernels/test_gluon_gqa.py
    for r in 1 2; do
        step ab_gqa_new$r 60 python -u benchmarks/kernel_ab.py --kv-heads 8 --cases rope --rounds 5 --tag new \
            --variant rope:triton=gluon=false
        step ab_gqa_old$r 60 env PYTHONPATH=.ab/old python -u benchmarks/kernel_ab.py --kv-heads 8 --cases rope \
            --rounds 5 --tag old
    done
    step table_gqa 150 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --no-naive \
        --shapes gqa --gs 1 --budget-s 120
    ;;
67)
    step gqa_tests 200 python -m pytest -q tests/kernels/test_gluon_gqa.py
    step smoke_gqa 80 python -u benchmarks/gpu_smoke.py
    step ab_gqa 120 python -u benchmarks/kernel_ab.py --kv-heads 8 --cases rope --rounds 5 \
        --variant rope:triton=gluon=false --variant rope:3stages=gluon_rope_stages=3
    step table_gqa 150 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --no-naive \
        --shapes gqa --gs 1 --budget-s 120
    ;;
66)
    step kernel_tests 470 python -m pytest -q -x tests/kernels/test_latent_attention.py tests/kernels/test_prefill_dispatch.py \
        tests/kernels/test_quant_latent_attention.py tests/kernels/test_gluon_rope.py tests/kernels/test_gluon_q4.py
    step smoke_mha 80 python -u benchmarks/gpu_smoke.py --mha
    ;;
65)
    step prefill_tests 150 python -m pytest -q tests/kernels/test_latent_attention.py tests/kernels/test_prefill_dispatch.py \
        tests/kernels/test_quant_latent_attention.py -k "prefill or rebuilt or lv or values or replicated"
    step parts 150 python -u benchmarks/prefill_parts_probe.py --ctx 4096 16384
    grep -E "keys gs2|keys\+values" "$OUT/parts.log"
    step prefill_table 130 python -u benchmarks/attention.py --prefill-only --budget-s 100
    step smoke_mha 90 python -u benchmarks/gpu_smoke.py --mha
    ;;
63)
    step prefill_tests 150 python -m pytest -q tests/kernels/test_latent_attention.py tests/kernels/test_prefill_dispatch.py \
        tests/kernels/test_quant_latent_attention.py -k "prefill or rebuilt or lv or values or replicated"
    step smoke_mha 90 python -u benchmarks/gpu_smoke.py --mha
    step prefill_table 130 python -u benchmarks/attention.py --prefill-only --budget-s 100
    step prefill4_gs1 120 python -u benchmarks/decode.py --layers 4 --batch 1 --context 4096 --prefill 4096
    grep -E "^inductor|^palu" "$OUT/prefill4_gs1.log"
    step prefill4_gs4 70 python -u benchmarks/decode.py --layers 4 --batch 1 --context 4096 --prefill 4096 \
        --paths palu --group-size 4
    grep -E "^palu" "$OUT/prefill4_gs4.log"
    ;;
64)
    step kernel_tests 480 python -m pytest -q -x tests/kernels/test_latent_attention.py \
        tests/kernels/test_quant_latent_attention.py tests/kernels/test_gluon_rope.py tests/kernels/test_gluon_q4.py
    ;;
56)
    step prefill_tests 120 python -m pytest -q tests/kernels/test_latent_attention.py \
        -k "replicated or prefill or values_rebuilt"
    step prefill_gs2 60 python -u benchmarks/prefill_probe.py --gs2
    step prefill_table 110 python -u benchmarks/attention.py --prefill-only --budget-s 90
    ;;
55)
    step prefill_gs2 100 python -u benchmarks/prefill_probe.py --gs2
    ;;
54)
    step kernel_tests 470 python -m pytest -q -x tests/kernels/test_latent_attention.py \
        tests/kernels/test_quant_latent_attention.py tests/kernels/test_prefill_dispatch.py
    step smoke_mha 100 python -u benchmarks/gpu_smoke.py --mha
    ;;
53)
    step table_gs4_all 560 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --no-naive \
        --quant-bits 4 --gs 4 --budget-s 500
    ;;
52)
    step up_values 60 python -u benchmarks/up_values_probe.py
    step table_gs4 200 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --no-naive \
        --quant-bits 4 --shapes llama2,gqa --batch 8 --ctx 32k --gs 4 --budget-s 170
    ;;
51)
    step lv_tests 150 python -m pytest -q tests/kernels/test_latent_attention.py \
        tests/kernels/test_quant_latent_attention.py tests/kernels/test_prefill_dispatch.py \
        -k "prefill or values or lv or rebuilt"
    step prefill_table 110 python -u benchmarks/attention.py --prefill-only --budget-s 90
    step table_b32 240 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --no-naive \
        --quant-bits 4 --shapes llama2 --batch 32 --ctx 128k --gs 1 2 4 --budget-s 200
    ;;
50)
    step lv_tests 150 python -m pytest -q tests/kernels/test_latent_attention.py \
        tests/kernels/test_quant_latent_attention.py tests/kernels/test_prefill_dispatch.py -k "prefill or values or lv"
    step smoke 90 python -u benchmarks/gpu_smoke.py
    step prefill_table 110 python -u benchmarks/attention.py --prefill-only --budget-s 90
    step table_gs4 100 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --no-naive \
        --quant-bits 4 --shapes llama2 --batch 8 --ctx 32k --gs 4 --budget-s 80
    step table_b32 130 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --no-naive \
        --quant-bits 4 --shapes llama2 --batch 32 --ctx 128k --gs 2 --budget-s 110
    ;;
49)
    step table_gs4 150 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --no-naive \
        --quant-bits 4 --shapes llama2 --batch 8 --ctx 32k --gs 4 --budget-s 120
    step table_b32 150 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --no-naive \
        --quant-bits 4 --shapes llama2 --batch 32 --ctx 128k --gs 2 --budget-s 130
    ;;
48)
    step kernel_tests 220 python -m pytest -q tests/kernels/test_latent_attention.py \
        tests/kernels/test_quant_latent_attention.py tests/kernels/test_prefill_dispatch.py
    step smoke 120 python -u benchmarks/gpu_smoke.py
    step prefill_table 220 python -u benchmarks/attention.py --prefill-only --budget-s 190
    ;;
1)
    step smoke 120 python -u benchmarks/gpu_smoke.py
    step decode8 420 python -u benchmarks/decode.py --layers 8 --batch 8 --context 16384 --steps 20 --profile
    ;;
2)
    step kernels 560 python -u benchmarks/attention.py --no-sweep --check --shapes llama2 --batch 8 --ctx 32k \
        --gs 1 2 --quant-bits 4 --no-prefill --budget-s 420
    ;;
3)
    step kernels_gs1 300 python -u benchmarks/attention.py --no-sweep --check --shapes llama2 --batch 8 --ctx 32k \
        --gs 1 --no-prefill --budget-s 200
    step decode8_modes 420 python -u benchmarks/decode.py --layers 8 --batch 8 --context 16384 --steps 20 \
        --modes default reduce-overhead
    ;;
4)  # palu first: Inductor's reduce-overhead run segfaulted with a lazily allocated StaticCache (torch 2.11)
    step decode8_palu 300 python -u benchmarks/decode.py --layers 8 --batch 8 --context 16384 --steps 20 \
        --paths palu --modes reduce-overhead default --profile
    step decode8_inductor 240 python -u benchmarks/decode.py --layers 8 --batch 8 --context 16384 --steps 20 \
        --paths inductor --modes default reduce-overhead
    ;;
5)  # the issue-4 table at full depth, with and without CUDA graphs
    step decode32_palu 300 python -u benchmarks/decode.py --layers 32 --batch 8 --context 16384 --steps 20 \
        --paths palu --modes reduce-overhead default
    step decode32_inductor 270 python -u benchmarks/decode.py --layers 32 --batch 8 --context 16384 --steps 20 \
        --paths inductor --modes reduce-overhead default
    ;;
6)  # the small per-tile loads a tile ahead (KernelConfig.prefetch): kernel A/B and checks
    step kernels_prefetch 560 python -u benchmarks/attention.py --no-sweep --check --shapes llama2 --batch 8 \
        --ctx 32k --gs 1 --quant-bits 4 --no-prefill --budget-s 360
    ;;
7)  # in-model effect: 8 layers with CUDA graphs, the gs1 kernels and the 4-bit cache
    step decode8_group 200 python -u benchmarks/decode.py --layers 8 --batch 8 --context 16384 --steps 20 \
        --paths palu --modes reduce-overhead --gs1-kernel group
    step decode8_per_head 200 python -u benchmarks/decode.py --layers 8 --batch 8 --context 16384 --steps 20 \
        --paths palu --modes reduce-overhead --gs1-kernel per-head
    step decode8_q4 190 python -u benchmarks/decode.py --layers 8 --batch 8 --context 16384 --steps 20 \
        --paths palu --modes reduce-overhead --bits 4
    ;;
8)  # 4-bit codes dequantized a 32-bit word at a time (KernelConfig.word_dequant) and the RoPE
    # per-head kernel's single [Wa | Wb] product: GPU tests, checks, gs1 rows with the A/B
    step pytest_gpu 110 python -m pytest -q -p no:cacheprovider tests/kernels/test_dequant_words.py \
        tests/kernels/test_latent_attention.py tests/kernels/test_quant_latent_attention.py -k "words or per_head"
    step kernels_gs1 460 python -u benchmarks/attention.py --no-sweep --check --shapes llama2 --batch 8 \
        --ctx 32k --gs 1 --quant-bits 4 --no-prefill --budget-s 330
    ;;
8q)  # the 4-bit rows of case 8 alone
    step kernels_gs1_q4 400 python -u benchmarks/attention.py --no-sweep --shapes llama2 --batch 8 --ctx 32k \
        --gs 1 --quant-bits 4 --quant-only --no-prefill --budget-s 300
    ;;
9)  # issue 5 in a model: 32 layers at 4 bits with CUDA graphs
    step decode32_q4 400 python -u benchmarks/decode.py --layers 32 --batch 8 --context 16384 --steps 20 \
        --paths palu --modes reduce-overhead --bits 4
    ;;
11)  # occupancy sweep of the 4-bit rows now that the word-wise dequantization freed the ALU
    step kernels_q4_wide 560 python -u benchmarks/attention.py --no-sweep --wide --shapes llama2 --batch 8 \
        --ctx 32k --gs 1 --quant-bits 4 --quant-only --no-prefill --budget-s 200
    ;;
16)  # KernelConfig.fill_waves (the RoPE gs1 default): kernel A/B, then the model
    step split_counts 150 python -u benchmarks/split_counts.py
    step decode32_palu 130 python -u benchmarks/decode.py --layers 32 --batch 8 --context 16384 --steps 20 \
        --paths palu --modes reduce-overhead
    step decode32_q4 110 python -u benchmarks/decode.py --layers 32 --batch 8 --context 16384 --steps 20 \
        --paths palu --modes reduce-overhead --bits 4
    ;;
15)  # how many splits: programs per SM 1-16, interleaved rounds, four (batch, context) points
    step split_counts 400 python -u benchmarks/split_counts.py
    ;;
14)  # occupancy and split-count variants of the fp16 gs1 rows
    step kernels_fp16_wide 400 python -u benchmarks/attention.py --no-sweep --wide --shapes llama2 --batch 8 \
        --ctx 32k --gs 1 --no-prefill --budget-s 200
    ;;
13)  # the word-wise 4-bit dequantization in fp16 and bf16: GPU tests, then every GPU check
    step pytest_words 200 python -m pytest -q -p no:cacheprovider tests/kernels/test_dequant_words.py
    step checks 200 python -u benchmarks/attention.py --check-only --shapes llama2 --gs 1 2 --quant-bits 4
    step kernels_bf16_q4 200 python -u benchmarks/attention.py --no-sweep --bf16 --shapes llama2 --batch 8 \
        --ctx 32k --gs 1 --quant-bits 4 --quant-only --no-prefill --budget-s 120
    ;;
12)  # issue 4 on one machine: Inductor and palu, 32 layers, CUDA graphs, batch 8, 16k
    step decode32_inductor 280 python -u benchmarks/decode.py --layers 32 --batch 8 --context 16384 --steps 20 \
        --paths inductor --modes reduce-overhead
    step decode32_palu 250 python -u benchmarks/decode.py --layers 32 --batch 8 --context 16384 --steps 20 \
        --paths palu --modes reduce-overhead
    ;;
10)  # issues 4 and 5 in a model after a kernel change: palu only (Inductor's code did not change)
    step decode32_palu 290 python -u benchmarks/decode.py --layers 32 --batch 8 --context 16384 --steps 20 \
        --paths palu --modes reduce-overhead
    step decode32_q4 290 python -u benchmarks/decode.py --layers 32 --batch 8 --context 16384 --steps 20 \
        --paths palu --modes reduce-overhead --bits 4
    ;;
17)  # per-tile barriers: running sums per token slot, heads merged into one tile (KernelConfig.merge_heads)
    step ab_new 300 python -u benchmarks/kernel_ab.py --tag new --variant rope:2-stages=num_stages=2 \
        --variant abs:unmerged=merge_heads=false --variant rope4:unmerged=merge_heads=false \
        --variant abs4:unmerged=merge_heads=false --variant abs4:waves=fill_waves=true \
        --variant abs4:3-stages=num_stages=3
    if [ -d .ab/old ]; then
        step ab_old 150 env PYTHONPATH=.ab/old python -u benchmarks/kernel_ab.py --tag old
    fi
    step pytest_gpu 140 python -m pytest -q -p no:cacheprovider tests/kernels/test_latent_attention.py \
        tests/kernels/test_quant_latent_attention.py tests/kernels/test_dequant_words.py -k "per_head or words or mask"
    ;;
18)  # merged 4-bit absorbed programs of two heads fit four programs per SM (128 registers)
    step ab_abs4 150 python -u benchmarks/kernel_ab.py --tag new --cases abs4 rope \
        --variant abs4:x2-2s=group_heads=2 --variant abs4:x2-3s=group_heads=2,num_stages=3 \
        --variant abs4:x2-4s=group_heads=2,num_stages=4 --variant abs4:x4-3s=num_stages=3 \
        --variant abs4:x2-3s-waves=group_heads=2,num_stages=3,fill_waves=true
    step decode32_palu 200 python -u benchmarks/decode.py --layers 32 --batch 8 --context 16384 --steps 20 \
        --paths palu --modes reduce-overhead
    step decode32_inductor 230 python -u benchmarks/decode.py --layers 32 --batch 8 --context 16384 --steps 20 \
        --paths inductor --modes reduce-overhead
    ;;
19)  # the issue-4 pair a second time (another machine), the 4-bit model, RoPE tiles of 128 tokens
    step ab_rope 150 python -u benchmarks/kernel_ab.py --tag new --cases rope rope4 abs4 \
        --variant rope:128-8w-2s=block_s=128,num_warps=8,num_stages=2 \
        --variant rope:128-8w-3s=block_s=128,num_warps=8,num_stages=3
    step decode32_palu 200 python -u benchmarks/decode.py --layers 32 --batch 8 --context 16384 --steps 20 \
        --paths palu --modes reduce-overhead
    step decode32_inductor 230 python -u benchmarks/decode.py --layers 32 --batch 8 --context 16384 --steps 20 \
        --paths inductor --modes reduce-overhead
    step decode32_q4 200 python -u benchmarks/decode.py --layers 32 --batch 8 --context 16384 --steps 20 \
        --paths palu --modes reduce-overhead --bits 4
    ;;
20)  # the issue-3 table with the configs the library picks (one timing per row)
    step table 570 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --budget-s 470
    ;;
22)  # prefill (issue 3): unpadded latent values per SDPA backend, then the prefill table
    step prefill_probe 200 python -u benchmarks/prefill_probe.py
    step prefill_table 300 python -u benchmarks/attention.py --prefill-only --budget-s 240
    ;;
21)  # the gs1 rows without a mask (as the table times them), new and previous code, twice each
    for round in 1 2; do
        step ab_nomask_new$round 100 python -u benchmarks/kernel_ab.py --tag new --no-mask --rounds 2 \
            --variant abs:unmerged=merge_heads=false
        step ab_nomask_old$round 100 env PYTHONPATH=.ab/old python -u benchmarks/kernel_ab.py --tag old --no-mask --rounds 2
    done
    ;;
23)
    step gluon_tests 240 python -m pytest -q tests/kernels/test_gluon_q4.py
    step gluon_ab 400 python -u benchmarks/kernel_ab.py --cases abs4 --rounds 5 \
        --variant abs4:g4x32s3=gluon=true \
        --variant abs4:g4x32s2=gluon=true,gluon_stages=2 \
        --variant abs4:g4x64s2=gluon=true,gluon_block_s=64,gluon_stages=2 \
        --variant abs4:g2x64s3=gluon=true,gluon_heads=2,gluon_block_s=64 \
        --variant abs4:g2x32s3=gluon=true,gluon_heads=2 \
        --variant abs4:g4x32s4=gluon=true,gluon_stages=4
    ;;
24)
    step gluon_tests 240 python -m pytest -q tests/kernels/test_gluon_q4.py tests/kernels/test_quant_latent_attention.py
    step table_q4 420 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --quant-bits 4 \
        --quant-only --check --budget-s 330
    ;;
25)
    step quant_diag 120 python -u benchmarks/quant_diag.py
    step gluon_tests 120 python -m pytest -q tests/kernels/test_gluon_q4.py
    step table_q4 400 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --quant-bits 4 \
        --quant-only --check --budget-s 300
    ;;
26)
    step quant_diag 120 python -u benchmarks/quant_diag.py
    step ab_mask 150 python -u benchmarks/kernel_ab.py --cases abs4 --rounds 4 --variant abs4:triton=gluon=false
    step ab_nomask 150 python -u benchmarks/kernel_ab.py --cases abs4 --rounds 4 --no-mask --variant abs4:triton=gluon=false
    step pytest_quant 200 python -m pytest -q tests/kernels/test_quant_latent_attention.py
    ;;
27)
    step pytest_gpu 240 python -m pytest -q tests/kernels/test_quant_latent_attention.py tests/kernels/test_gluon_q4.py \
        tests/kernels/test_split_plan.py
    step ab_mask 100 python -u benchmarks/kernel_ab.py --cases abs4 --rounds 4 --variant abs4:triton=gluon=false
    step ab_nomask 100 python -u benchmarks/kernel_ab.py --cases abs4 --rounds 4 --no-mask --variant abs4:triton=gluon=false
    step table_q4 330 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --quant-bits 4 \
        --quant-only --budget-s 260
    ;;
28)
    step gluon_tests 150 python -m pytest -q tests/kernels/test_gluon_q4.py
    step table_q4_target 200 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --quant-bits 4 \
        --quant-only --shapes llama2 --batch 8 --ctx 32k --budget-s 150
    ;;
29)
    step gluon_tests 150 python -m pytest -q tests/kernels/test_gluon_q4.py
    step table_q4_bf16 200 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --quant-bits 4 \
        --quant-only --shapes llama2 --batch 8 --ctx 32k --bf16 --budget-s 150
    ;;
30)
    step rope_tests 200 python -m pytest -q -x tests/kernels/test_gluon_rope.py
    step rope_ab 200 python -u benchmarks/kernel_ab.py --cases rope rope4 --rounds 3 \
        --variant rope:triton=gluon=false --variant rope4:triton=gluon=false
    step table_rope 150 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --quant-bits 4 \
        --shapes llama2 --batch 8 --ctx 32k --gs 1 --no-naive --budget-s 120
    ;;
31)
    step rope_tests 200 python -m pytest -q -x tests/kernels/test_gluon_rope.py
    step rope_ab 300 python -u benchmarks/kernel_ab.py --cases rope rope4 --rounds 3 \
        --variant rope:triton=gluon=false --variant rope:global=gluon_rope_smem_tables=false \
        --variant rope:g168=gluon_rope_smem_tables=false,gluon_rope_regs=168 \
        --variant rope4:triton=gluon=false --variant rope4:global=gluon_rope_smem_tables=false \
        --variant rope4:g168=gluon_rope_smem_tables=false,gluon_rope_regs=168 \
        --variant rope4:s168=gluon_rope_regs=168
    ;;
32)
    OUT=$OUT bash benchmarks/ncu_session.sh rope
    step rope_ab 300 python -u benchmarks/kernel_ab.py --cases rope rope4 --rounds 3 \
        --variant rope:st3=gluon_rope_stages=3 --variant rope4:global=gluon_rope_smem_tables=false \
        --variant rope4:global3=gluon_rope_smem_tables=false,gluon_rope_stages=3
    ;;
33)
    for tcm in .ca "" .ca ""; do
        PALU_FX_ROPE_TCM=$tcm step rope_ab_tcm${tcm} 150 python -u benchmarks/kernel_ab.py --cases rope rope4 \
            --rounds 3 --tag "tcm${tcm:-cg}" --variant rope4:global=gluon_rope_smem_tables=false
    done
    ;;
34)
    step rope_tests 200 python -m pytest -q -x tests/kernels/test_gluon_rope.py
    step rope_ab 300 python -u benchmarks/kernel_ab.py --cases rope rope4 --rounds 3 \
        --variant rope:triton=gluon=false --variant rope:h2=gluon_rope_heads=2 \
        --variant rope4:triton=gluon=false --variant rope4:global=gluon_rope_smem_tables=false \
        --variant rope4:h2=gluon_rope_heads=2 --variant rope4:h2g=gluon_rope_heads=2,gluon_rope_smem_tables=false
    ;;
35)
    step rope_tests 200 python -m pytest -q tests/kernels/test_gluon_rope.py
    step rope_ab 300 python -u benchmarks/kernel_ab.py --cases rope rope4 --rounds 3 \
        --variant rope:h2g=gluon_rope_heads=2,gluon_rope_smem_tables=false \
        --variant rope:h2g168=gluon_rope_heads=2,gluon_rope_smem_tables=false,gluon_rope_regs=168 \
        --variant rope4:h2g=gluon_rope_heads=2,gluon_rope_smem_tables=false \
        --variant rope4:h2g3=gluon_rope_heads=2,gluon_rope_smem_tables=false,gluon_rope_stages=3
    ;;
36)
    step rope_tests 200 python -m pytest -q tests/kernels/test_gluon_rope.py
    step rope_ab 300 python -u benchmarks/kernel_ab.py --cases rope rope4 --rounds 4 \
        --variant rope:triton=gluon=false --variant rope:h2t2=gluon_rope_heads=2,gluon_rope_tables=2 \
        --variant rope4:triton=gluon=false --variant rope4:h2t2=gluon_rope_heads=2,gluon_rope_tables=2 \
        --variant rope4:h2t1=gluon_rope_heads=2,gluon_rope_tables=1
    ;;
37)
    step rope_tests 150 python -m pytest -q tests/kernels/test_gluon_rope.py
    step table_gs1 330 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --no-naive \
        --quant-bits 4 --shapes llama2 --batch 1 8 32 --ctx 4k 32k 128k --gs 1 --budget-s 300
    step table_bf16 90 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --no-naive \
        --quant-bits 4 --shapes llama2 --batch 8 --ctx 32k --gs 1 --bf16 --budget-s 60
    ;;
38)
    step rope_tests 150 python -m pytest -q tests/kernels/test_gluon_rope.py
    step smoke_mha 150 python -u benchmarks/gpu_smoke.py --mha
    step kernel_tests 120 python -m pytest -q tests/kernels/test_gluon_q4.py tests/kernels/test_quant_latent_attention.py \
        -k "gluon or per_head or rope"
    step rope_ab 100 python -u benchmarks/kernel_ab.py --cases rope rope4 --rounds 3 --variant rope:triton=gluon=false \
        --variant rope4:triton=gluon=false
    ;;
39)
    step rope_tests 100 python -m pytest -q tests/kernels/test_gluon_rope.py
    step rope_ab 90 python -u benchmarks/kernel_ab.py --cases rope4 --rounds 3 --variant rope4:triton=gluon=false
    ;;
47)
    step table_b32 130 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --no-naive \
        --quant-bits 4 --shapes llama2 --batch 32 --ctx 128k --gs 2 --budget-s 110
    ;;
46)
    step rope_ab_r128 120 python -u benchmarks/kernel_ab.py --rank-ratio 1.0 --cases rope rope4 --rounds 3 \
        --variant rope:t1=gluon_rope_tables=1 --variant rope:triton=gluon=false --variant rope4:triton=gluon=false
    ;;
45)
    step rope_tests 150 python -m pytest -q tests/kernels/test_gluon_rope.py
    step rope_ab_gs2 80 python -u benchmarks/kernel_ab.py --gs 2 --cases rope rope4 --rounds 3
    ;;
44)
    step rope_tests 120 python -m pytest -q tests/kernels/test_gluon_rope.py
    step smoke_mha 100 python -u benchmarks/gpu_smoke.py --mha
    step rope_ab_gs2 100 python -u benchmarks/kernel_ab.py --gs 2 --cases rope rope4 --rounds 3 \
        --variant rope:triton=gluon=false --variant rope4:triton=gluon=false
    step table_gs2 150 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --no-naive \
        --quant-bits 4 --shapes llama2 --batch 1 8 32 --ctx 32k 128k --gs 2 --budget-s 130
    ;;
43)
    for round in 1 2; do
        step ab_gs2_new$round 60 python -u benchmarks/kernel_ab.py --gs 2 --cases rope --rounds 3 --tag new
        for v in ring3a old; do
            step ab_gs2_$v$round 60 env PYTHONPATH=.ab/$v python -u benchmarks/kernel_ab.py --gs 2 --cases rope \
                --rounds 3 --tag $v
        done
    done
    step rope_tests 120 python -m pytest -q tests/kernels/test_gluon_rope.py
    ;;
42)
    step rope_tests 120 python -m pytest -q tests/kernels/test_gluon_rope.py
    step kernel_tests 150 python -m pytest -q tests/kernels/test_gluon_q4.py tests/kernels/test_quant_latent_attention.py \
        tests/kernels/test_latent_attention.py -k "gluon or per_head or rope or group"
    step smoke_mha 150 python -u benchmarks/gpu_smoke.py --mha
    step rope_ab_gs2 100 python -u benchmarks/kernel_ab.py --gs 2 --cases rope rope4 --rounds 3 \
        --variant rope:triton=gluon=false --variant rope4:triton=gluon=false
    step rope_ab_gs1 60 python -u benchmarks/kernel_ab.py --cases rope rope4 --rounds 3
    ;;
41)
    step rope_tests 150 python -m pytest -q tests/kernels/test_gluon_rope.py
    step rope_ab_gs2 200 python -u benchmarks/kernel_ab.py --gs 2 --cases rope rope4 --rounds 3 \
        --variant rope:h1t2=gluon_rope_heads=1,gluon_rope_tables=2 --variant rope:h2t1=gluon_rope_tables=1 \
        --variant rope4:h1t1=gluon_rope_heads=1,gluon_rope_tables=1 --variant rope4:h2t1=gluon_rope_tables=1
    step rope_ab_gs1 80 python -u benchmarks/kernel_ab.py --cases rope rope4 --rounds 3
    step table_gs2 150 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --no-naive \
        --quant-bits 4 --shapes llama2 --batch 1 8 32 --ctx 32k 128k --gs 2 --budget-s 130
    ;;
40)
    step rope_tests 150 python -m pytest -q tests/kernels/test_gluon_rope.py
    step rope_ab_gs2 200 python -u benchmarks/kernel_ab.py --gs 2 --cases rope rope4 --rounds 3 \
        --variant rope:triton=gluon=false --variant rope:t1=gluon_rope_tables=1 --variant rope:t0=gluon_rope_tables=0 \
        --variant rope:h2=gluon_rope_heads=2 --variant rope4:triton=gluon=false --variant rope4:t0=gluon_rope_tables=0
    step table_gs2 180 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --no-naive \
        --quant-bits 4 --shapes llama2 --batch 1 8 32 --ctx 32k 128k --gs 2 --budget-s 160
    ;;
62)
    step kernel_tests 480 python -m pytest -q -x tests/kernels/test_latent_attention.py \
        tests/kernels/test_quant_latent_attention.py tests/kernels/test_prefill_dispatch.py tests/kernels/test_gluon_q4.py
    ;;
61)
    for run in "gs4 palu 4" "gs4_q4 palu 4 --bits 4" "gs1 palu 1" "inductor inductor 1"; do
        set -- $run
        name=$1 path=$2 gs=$3; shift 3
        step decode32_$name 130 python -u benchmarks/decode.py --layers 32 --batch 8 --context 16384 --steps 20 \
            --paths $path --modes reduce-overhead --group-size $gs "$@"
        grep -E "reduce-overhead|Llama" "$OUT/decode32_$name.log" | tail -2
    done
    step smoke_mha 100 python -u benchmarks/gpu_smoke.py --mha
    ;;
60)
    step prefill_tests 150 python -m pytest -q tests/kernels/test_latent_attention.py tests/kernels/test_prefill_dispatch.py \
        -k "prefill or rebuilt or lv or values or replicated"
    step parts 120 python -u benchmarks/prefill_parts_probe.py --ctx 4096 16384
    grep -E "values|keys gs4" "$OUT/parts.log"
    step prefill_table 170 python -u benchmarks/attention.py --prefill-only --budget-s 140
    ;;
59)
    step gluon_tests 200 python -m pytest -q tests/kernels/test_gluon_q4.py tests/kernels/test_quant_latent_attention.py \
        -k "gluon or mqa or gqa"
    step prefill_tests 150 python -m pytest -q tests/kernels/test_latent_attention.py tests/kernels/test_prefill_dispatch.py \
        -k "prefill or rebuilt or lv or values or replicated"
    step prefill_table 170 python -u benchmarks/attention.py --prefill-only --budget-s 140
    step q4_gqa_gs4 130 python -u benchmarks/attention.py --no-sweep --defaults-only --no-prefill --no-naive \
        --quant-bits 4 --quant-only --shapes gqa --gs 4 --batch 1 8 32 --ctx 32k 128k --budget-s 100
    ;;
57)
    step parts 300 python -u benchmarks/prefill_parts_probe.py --ctx 4096 16384
    cat "$OUT/parts.log"
    ;;
58)
    step sweep 400 python -u benchmarks/prefill_parts_probe.py --sweep --ctx 4096 16384
    cat "$OUT/sweep.log"
    ;;
esac
