#!/usr/bin/env bash
# Everything that needs a GPU, in one go: the CUDA tests, the inference and training benchmarks on CUDA
# (fp32, fp16, bf16), accum_freq's memory and speed, an fp16 ONNX export made on the GPU, and the English
# demo. Each part's output is also written to OUT_DIR.
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]      (default logs/gpu_check; open_clip installed for the peers)
#
# PARTS="tests inference train accum onnx demo decode" (the default) picks the parts and the order they run in;
# "name:seconds" gives a part its own time limit (`timeout`), and DEADLINE=seconds ends the whole run in time
# (each part's limit is cut to what is left; a part with under 20 s left is skipped, said), so a lease that ends
# still leaves every finished part's log and a cut part's lines so far. A summary line per part comes last.
# decode compares nvJPEG decoding on the GPU with the CPU's reduced-scale decode for 12-MP photos
# (bench_gpu_decode.py). "embed" (mode=embed under torchrun on nccl) and "index10m" (bench_index at 10M vectors in
# a 2 GiB budget: 10 GB of scratch disk, CPU-bound, tens of minutes) run only when named. "fast" runs bench_fast.py
# on the GPU machine's CPU (another vendor's CPU, maybe with AMX: oneDNN's path against MKL, onnxruntime and
# open_clip, and the bf16 ratio against that CPU's own matmul ratio) at all cores, then at 1 thread. "lora" trains
# the toy set with LoRA adapters on CUDA in bf16 and in fp16 with accum_freq 2 (AMP, accumulation and LoRA on the
# GPU in one run each). "generate" times CoCa captions with the decoder's key-value cache against the whole prefix
# and open_clip's loop, in fp32 and fp16 (bench_generate.py; never run on a GPU yet). "inference" also times SigLIP 2 (timm image tower, SigLIP text tower) against open_clip's
# model of that name. "train" covers AMP/bf16 training speed (TRAIN_PRECISIONS="fp32 fp16 bf16"), "accum"
# accumulation, "onnx" the fp16 export, "decode" nvJPEG.
# Part durations on the H200 machine (2026-12-04, its torch 2.11, open_clip and the pinned timm/transformers carried
# as wheels): tests over 130 s; inference 75 s for both phis; train about 60 s a precision; onnx 50 s (its files
# written, it was cut at a 50 s limit: give it onnx:90); lora 60 s;
# embed 40 s; accum over 50 s; decode over 50 s (it makes its 64 photos first); fast over 140 s (two ONNX exports
# per thread count). A 15-minute lease holds about two full calls.
set -uo pipefail
out=${1:-logs/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 out py=${PYTHON:-python3}

part_tests() {
    $py -m pytest -q -rs tests/test_cuda.py tests/test_metrics.py::test_cuda_matches_cpu 2>&1 | tee "$out/tests.txt"
}

part_inference() {
    for phi in openai/VIT-B-32 ViT-B-16-SigLIP2; do
        $py benchmarks/bench_inference.py --phi "$phi" --device cuda --reps 5 --warmup 2 2>&1 \
            | tee "$out/bench_inference_${phi//\//_}.txt"
    done
}

part_train() {
    for precision in ${TRAIN_PRECISIONS:-fp32 fp16 bf16}; do
        $py benchmarks/bench_train.py --device cuda --precision "$precision" --phi openai/VIT-B-32 --batch 256 \
            --steps 10 2>&1 | tee "$out/bench_train_$precision.txt"
    done
}

part_accum() {
    for precision in fp32 bf16; do
        $py benchmarks/bench_accum.py --device cuda --precision "$precision" --phi openai/VIT-B-32 --batch 256 \
            --accum 8 --steps 3 2>&1 | tee "$out/bench_accum_$precision.txt"
    done
}

part_onnx() {
    $py predict.py --mode export_onnx --phi openai/VIT-B-32 --model_path "" --export_fp16 true --Cuda true \
        --export_dir "$(mktemp -d)/onnx_fp16" 2>&1 | tee "$out/export_onnx_fp16.txt"
}

part_demo() {
    { time $py train.py --demo en --Cuda true ; } 2>&1 | tail -40 | tee "$out/demo_en.txt"
}

part_decode() {
    $py benchmarks/bench_gpu_decode.py --count 64 --batch 32 2>&1 | tee "$out/bench_gpu_decode.txt"
}

part_embed() {
    local toy; toy=$(mktemp -d)
    { $py -c "from utils.data.toy import make_toy_dataset as m; m('$toy', n_train=256, n_val=2, seed=0)" \
        && $py -m torch.distributed.run --nproc_per_node 1 predict.py --mode embed --distributed true --Cuda true \
            --model_path "" --phi openai/VIT-B-32 --caption_file "$toy/en_train.json" --embeddings_dir "$toy/emb" \
            --part_size 64; } 2>&1 | tail -5 | tee "$out/embed_nccl.txt"
}

part_index10m() {
    $py benchmarks/bench_index.py --vectors 10000000 --index_memory 2G --types auto --threads "$(nproc)" 2>&1 \
        | grep --line-buffered -v WARNING | tee "$out/bench_index_10m.txt"
}

part_fast() {
    for threads in "$(nproc)" 1; do
        $py benchmarks/bench_fast.py --phi openai/VIT-B-32 --batch 1 32 --reps 5 --threads "$threads" 2>&1 \
            | grep --line-buffered -v -i warning | tee "$out/bench_fast_$threads.txt"
    done
}

part_lora() {
    local toy; toy=$(mktemp -d)
    { $py -c "from utils.data.toy import make_toy_dataset as m; m('$toy', n_train=512, n_val=64, seed=0)" \
        && for run in "bf16 1" "fp16 2"; do set -- $run
            $py train.py --Cuda true --precision "$1" --accum_freq "$2" --model_path "" --phi openai/VIT-B-32 \
                --lora_r 8 --datasets_path "$toy/" --datasets_train_json_path "$toy/en_train.json" \
                --datasets_val_json_path "$toy/en_val.json" --batch_size 64 --Epoch 1 --eval_flag false \
                --save_dir "$toy/logs_$1" 2>&1 | tail -15
        done; } 2>&1 | tee "$out/train_lora.txt"
}

part_generate() {
    for precision in fp32 fp16; do
        $py benchmarks/bench_generate.py --device cuda --precision "$precision" --images 1 16 --reps 3 2>&1 \
            | grep --line-buffered -v WARNING | tee "$out/bench_generate_$precision.txt"
    done
}

export -f part_tests part_inference part_train part_accum part_onnx part_demo part_decode part_embed \
    part_index10m part_fast part_lora part_generate

start=$SECONDS
summary=()
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/gpu.txt"
$py -c "import torch, torchvision, transformers, open_clip; print('torch', torch.__version__, 'torchvision',
torchvision.__version__, 'transformers', transformers.__version__, 'open_clip', open_clip.__version__)" \
    2>&1 | tee -a "$out/gpu.txt"
for spec in ${PARTS:-tests inference train accum onnx demo decode}; do
    name=${spec%%:*}; limit=0; [[ $spec == *:* ]] && limit=${spec#*:}
    if ! declare -F "part_$name" > /dev/null; then
        echo "gpu_check: no part named '$name' (parts: tests inference train accum onnx demo decode embed index10m" \
            "fast lora generate)"; summary+=("$name: unknown"); continue
    fi
    if [[ -n ${DEADLINE:-} ]]; then
        left=$(( DEADLINE - (SECONDS - start) ))
        if (( left < 20 )); then echo "gpu_check: $name skipped, ${left} s left"; summary+=("$name: skipped"); continue; fi
        (( limit == 0 || limit > left )) && limit=$left
    fi
    echo "=== $name$( (( limit )) && echo " (limit $limit s)")"
    began=$SECONDS
    timeout -k 5 "$limit" bash -o pipefail -c "part_$name"  # a limit of 0 is none
    rc=$?
    summary+=("$name: $( ((rc == 124 || rc == 137)) && echo "cut at its limit" || echo "rc $rc") after $((SECONDS - began)) s")
done
printf 'gpu_check: %s\n' "${summary[@]}"
exit 0
