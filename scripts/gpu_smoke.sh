#!/usr/bin/env bash
# Smoke test on a machine with one GPU (the README's "On rented GPUs"), from the repo root:
#     bash scripts/gpu_smoke.sh [OUTDIR]
# One rank per GPU needs as many GPUs as ranks, so with one GPU this runs:
#   1. the single-GPU reference: a few steps of the reference GPT on cuda (fp32 and bf16 autocast)
#      beside the same steps on the CPU;
#   2. torchrun with one process: NCCL on the GPU, `python -m minipar.train` in fp32, bf16 and
#      --zero 3, and ZeRO-3 through `minipar.launch` (world size 1);
#   3. torchrun with 8 (and 4) processes and the GPU hidden: the multi-rank torchrun path on gloo,
#      DualPipeV and ZeRO-3 + TP included.
# Each step prints what it ran; the script stops at the first failure.
set -euo pipefail
OUT=${1:-runs/gpu_smoke}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd) PYTHONUNBUFFERED=1
TR="python3 -m torch.distributed.run --standalone"

echo "== 1. single-GPU reference"
python3 - <<'EOF'
import torch
from minipar.model import GPT, GPTConfig, SyntheticData, make_optimizer, train_reference
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
cfg = GPTConfig(vocab=64, seq=32, layers=2, heads=4, hidden=64)
cpu = train_reference(cfg, steps=5, batch_size=8).losses
for dtype in (torch.float32, torch.bfloat16):
    torch.manual_seed(0)
    model = GPT(cfg, 0).cuda()
    opt, data, losses = make_optimizer(model.parameters()), SyntheticData(cfg.vocab, cfg.seq, 0), []
    for step in range(5):
        x, y = (t.cuda() for t in data.batch(step, 8))
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    err = max(abs(a - b) for a, b in zip(losses, cpu))
    print(f"cuda {str(dtype):>14}: losses {[round(l, 4) for l in losses]}, max |cuda - cpu| {err:.2e}")
    assert err < (1e-3 if dtype == torch.float32 else 5e-2)
EOF

echo "== 2a. torchrun, 1 process, NCCL: minipar.train fp32 (small model, parity checked)"
$TR --nproc_per_node 1 -m minipar.train --dp 1 --pp 1 --tp 1 --zero 1 --steps 6 --out "$OUT/fp32"

echo "== 2b. torchrun, 1 process, NCCL: minipar.train bf16 (a model the GPU notices)"
$TR --nproc_per_node 1 -m minipar.train --dp 1 --pp 1 --tp 1 --zero 1 --precision bf16 --layers 8 --hidden 1024 \
    --heads 16 --seq 1024 --vocab 1024 --batch 16 --steps 10 --no-check --out "$OUT/bf16"

echo "== 2c. torchrun, 1 process, NCCL: ZeRO-3 through minipar.launch"
cat > "$OUT/zero3.py" <<'EOF'
import torch
import minipar
from minipar.model import GPTConfig
from minipar.precision import MixedPrecision
from minipar.zero import train_zero
cfg = GPTConfig(vocab=256, seq=128, layers=4, heads=8, hidden=256)
out = minipar.launch(train_zero, 1, cfg, 3, steps=4, batch_size=8, precision=MixedPrecision("bf16"))[0]
from minipar.plan import model_state_bytes
m = out["memory"]
held, formula = m["params"] + m["grads"] + m["optimizer"], model_state_bytes(out["padded_params"], 1, 3)
print("ZeRO-3 bf16 on", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
      "losses", [round(l, 4) for l in out["losses"]], f"model states {held:,} B, formula 16Ψ = {formula:,.0f} B")
assert all(l == l for l in out["losses"]) and held == formula
EOF
$TR --nproc_per_node 1 "$OUT/zero3.py"

echo "== 2d. torchrun, 1 process, NCCL: minipar.train --zero 3 (FSDP units on the GPU, parity checked)"
$TR --nproc_per_node 1 -m minipar.train --dp 1 --pp 1 --tp 1 --zero 3 --steps 6 --out "$OUT/zero3"

echo "== 3. torchrun, 8 processes, GPU hidden (gloo): minipar.train's default dp2 x pp2 x tp2"
CUDA_VISIBLE_DEVICES= $TR --nproc_per_node 8 -m minipar.train --dp 2 --pp 2 --tp 2 --zero 1 --steps 4 --out "$OUT/gloo8"

echo "== 3b. torchrun, 4 processes, GPU hidden (gloo): DualPipeV's F&B pairs; ZeRO-3 with TP + SP, PP, MoE"
CUDA_VISIBLE_DEVICES= $TR --nproc_per_node 4 -m minipar.train --dp 1 --pp 4 --tp 1 --zero 1 --schedule dualpipev \
    --layers 8 --microbatches 8 --steps 4 --out "$OUT/dualpipev"
CUDA_VISIBLE_DEVICES= $TR --nproc_per_node 4 -m minipar.train --dp 2 --pp 1 --tp 2 --sp --zero 3 --steps 4 \
    --out "$OUT/fsdp_tp"
CUDA_VISIBLE_DEVICES= $TR --nproc_per_node 4 -m minipar.train --dp 2 --pp 2 --tp 1 --ep 1 --zero 3 \
    --microbatches 4 --steps 4 --out "$OUT/fsdp_pp"
CUDA_VISIBLE_DEVICES= $TR --nproc_per_node 4 -m minipar.train --dp 2 --pp 1 --tp 1 --ep 2 --experts 4 --zero 3 \
    --seed 1 --steps 4 --out "$OUT/fsdp_moe"

echo "== all smoke steps passed"
