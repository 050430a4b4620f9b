#!/usr/bin/env bash
# One-shot GPU benchmark of capfilt against the plain Hugging Face recipe (random weights of
# the real BLIP shapes, no hub access needed). Each run writes one JSON file to $OUT.
#
#   OUT=/tmp/bench bash scripts/gpu_bench.sh          # from the repository root
#   PYTHON=/path/to/python STEP_TIMEOUT=240 bash scripts/gpu_bench.sh
#
# Order: the cheapest, most important checks first, so a short device lease still returns
# the caption numbers. A run that fails or times out leaves its .err file and the rest go on.
set -uo pipefail

OUT=${OUT:-./bench-out}
PY=${PYTHON:-python}
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONPATH="${PYTHONPATH:-}:$(pwd)"

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
"$PY" - >"$OUT/versions.txt" 2>&1 <<'EOF'
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("transformers", transformers.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "no cuda")
EOF

# Parity of the fast path on the GPU (bf16 and fp32, CUDA graphs on and off): greedy ids
# and ITM probabilities against plain transformers on a random base model.
timeout "$STEP_TIMEOUT" "$PY" - >"$OUT/gpu_parity.txt" 2>&1 <<'EOF'
import torch
from capfilt.bench import random_blip
from capfilt.models.fast import FastCaptioner, FastItm

device = torch.device("cuda")
for dtype in (torch.float32, torch.bfloat16):
    net, _ = random_blip("captioner", "base")
    net.to(device, dtype)
    pv = torch.randn(8, 3, 384, 384, device=device, dtype=dtype)
    with torch.inference_mode():
        ref = net.generate(pixel_values=pv, max_length=20, min_length=5, do_sample=False)
    for graphs in (False, True):
        got = FastCaptioner(net, cuda_graphs=graphs).generate(
            pv, max_length=20, min_length=5, do_sample=False)
        same = ref.shape == got.shape and bool((ref == got).all())
        agree = (ref[:, : got.shape[1]] == got[:, : ref.shape[1]]).float().mean().item()
        print(f"caption {dtype} cuda_graphs={graphs}: identical={same} token agreement={agree:.3f}")
    filt, tok = random_blip("filter", "base")
    filt.to(device, dtype)
    enc = tok.tokenizer(["w1 w2 w3", "w4 w5", "w6 w7 w8 w9 w10", "w11"], padding=True,
                        return_tensors="pt").to(device)
    index = torch.tensor([0, 0, 1, 1], device=device)
    pv2 = pv[:2]
    with torch.inference_mode():
        ref = filt(input_ids=enc.input_ids, pixel_values=pv2[index],
                   attention_mask=enc.attention_mask).itm_score.float().softmax(-1)[:, 1]
    fast = FastItm(filt)
    got = fast.itm(fast.encode_images(pv2), index, enc.input_ids, enc.attention_mask)
    print(f"itm {dtype}: max abs diff {(ref - got).abs().max().item():.2e}")
EOF
echo "gpu_parity rc=$?"

run() {
    local name=$1
    shift
    timeout "$STEP_TIMEOUT" "$PY" -m capfilt bench "$@" --json >"$OUT/$name.json" 2>"$OUT/$name.err"
    echo "$name rc=$?"
}

# Captioning: model level (tensors in) as in DESIGN.md's table, then end to end.
run caption-base-model caption --arch base --level model --images 1024 --batch-size 256
run caption-base-model-graphs caption --arch base --level model --images 1024 --batch-size 256 \
    --cuda-graphs
run caption-base-e2e caption --arch base --images 2048 --batch-size 256 --cuda-graphs --workers 8
run caption-large-model caption --arch large --level model --images 512 --batch-size 256 \
    --cuda-graphs
run caption-large-e2e caption --arch large --images 1024 --batch-size 256 --cuda-graphs \
    --workers 8
# Filtering: web + 1 synthetic caption per image (DESIGN.md's row), ITM only and with ITC.
run filter-large-model filter --arch large --level model --images 1024 --batch-size 256 \
    --captions-per-image 1 --no-itc
run filter-large-e2e filter --arch large --images 2048 --batch-size 256 --captions-per-image 1 \
    --workers 8
# Pretraining: MED ViT-B at 224 px, bf16 autocast.
run pretrain-base pretrain --arch base --images 512 --batch-size 64 --text-tokens 30
# torch.compile of the decode step (may compile slowly; last so it cannot starve the rest).
run caption-base-model-compile caption --arch base --level model --images 1024 \
    --batch-size 256 --compile

ls -l "$OUT"
