"""A hardware table: GPUs and the links between them. Add your own with `add_gpu` / `add_link`.

Numbers are vendor peak figures for dense bf16 math (no 2:4 sparsity) and per-GPU,
per-direction link bandwidth; each entry cites its datasheet. Latencies are the
per-message software+wire latency a ring step pays, order of magnitude from
nccl-tests small-message timings; they matter only for small messages.

Measured efficiencies, one per GPU generation or link kind (never per table):
* `matmul_efficiency`: the maximum achievable matmul FLOP/s (MAMF) over the datasheet
  peak, measured with bf16 `torch.matmul` over many shapes (S. Bekman, *Machine Learning
  Engineering*, "Maximum Achievable Matmul FLOPS comparison table": A100 SXM 267.9/312 =
  85.9%, H100 SXM 792.1/989 = 80.1%). H200 and H800 share H100's die and clocks; B200 has no
  published MAMF yet, so it borrows Hopper's fraction (an assumption, said so in its source).
* `attention_efficiency`: fused flash attention's fraction of peak, forward and backward
  together (Dao 2023, FlashAttention-2, Sec. 4: 50-73% of peak forward and up to 63% in
  backward on A100; Shah et al. 2024, FlashAttention-3: 75% forward, ~60% backward on H100).
* `Link.efficiency`: nccl-tests bus bandwidth over the line rate (NVLink: ~230 of 300 GB/s
  on DGX A100, ~360 of 450 on DGX H100; InfiniBand ~90% of the port's rate; RoCE below IB
  because of ECMP hash collisions and congestion control, Gangidi et al. 2024 (Meta, "RDMA
  over Ethernet for Distributed AI Training at Meta Scale") and MegaScale (Jiang et al. 2024)).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GPU", "Link", "GPUS", "LINKS", "add_gpu", "add_link", "get_gpu", "get_link"]


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float  # bytes/s per GPU per direction
    latency: float  # seconds per message (one ring step)
    source: str = ""
    efficiency: float = 0.8  # achieved bus bandwidth / line rate (nccl-tests)


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float  # dense bf16 FLOP/s
    memory: float  # bytes of HBM
    memory_bandwidth: float  # HBM bytes/s
    intra_node: str  # link name between GPUs of one node
    inter_node: str  # default link name between nodes (one NIC per GPU)
    gpus_per_node: int = 8
    source: str = ""
    sm_count: int = 132  # streaming multiprocessors (wave quantization of GEMM tiles)
    matmul_efficiency: float = 0.80  # MAMF / peak (see the module docstring)
    attention_efficiency: float = 0.60  # fused flash attention / peak, forward + backward
    topology: str | None = None  # default cluster (minipar.plan.topology), None: built from the links


GB, TFLOPS, US = 1e9, 1e12, 1e-6

LINKS: dict[str, Link] = {}
GPUS: dict[str, GPU] = {}


def add_link(link: Link) -> Link:
    """Register (or replace) a link so `estimate(..., inter_node="name")` can use it."""
    if link.bandwidth <= 0 or link.latency < 0 or not 0 < link.efficiency <= 1:
        raise ValueError(f"link {link.name!r}: bandwidth must be > 0, latency >= 0 and efficiency in (0, 1]")
    LINKS[link.name.lower()] = link
    return link


def add_gpu(gpu: GPU) -> GPU:
    """Register (or replace) a GPU so `estimate(..., gpu="name")` can use it."""
    if (
        gpu.peak_flops <= 0
        or gpu.memory <= 0
        or gpu.memory_bandwidth <= 0
        or gpu.gpus_per_node < 1
        or gpu.sm_count < 1
        or not 0 < gpu.matmul_efficiency <= 1
        or not 0 < gpu.attention_efficiency <= 1
    ):
        raise ValueError(
            f"gpu {gpu.name!r}: peak_flops, memory, memory_bandwidth, gpus_per_node and sm_count must "
            "be positive, the efficiencies in (0, 1]"
        )
    for ln in (gpu.intra_node, gpu.inter_node):
        if ln.lower() not in LINKS:
            raise ValueError(
                f"gpu {gpu.name!r} names link {ln!r}; add it first with add_link. "
                f"Known links: {sorted(LINKS)}"
            )
    GPUS[gpu.name.lower()] = gpu
    return gpu


def lookup(table: dict, item, kind: type, what: str, how_to_add: str):
    """`item` itself if it is a `kind`, else table[item] by case-insensitive name, or a clear error."""
    if isinstance(item, kind):
        return item
    key = str(item).lower()
    if key not in table:
        raise ValueError(f"unknown {what} {item!r}; choose one of {sorted(table)} or {how_to_add}")
    return table[key]


def get_gpu(gpu) -> GPU:
    return lookup(GPUS, gpu, GPU, "gpu", "register yours with minipar.plan.add_gpu(GPU(...))")


def get_link(link) -> Link:
    return lookup(LINKS, link, Link, "link", "register yours with minipar.plan.add_link(Link(...))")


for _l in [
    Link("pcie5", 64 * GB, 5 * US, "PCI-SIG PCIe 5.0: 32 GT/s x16 = 64 GB/s per direction", 0.8),
    Link(
        "nvlink3", 300 * GB, 3 * US, "NVIDIA A100 datasheet: NVLink 600 GB/s bidirectional (12 links)", 0.77
    ),
    Link("nvlink4", 450 * GB, 3 * US, "NVIDIA H100 datasheet: NVLink 900 GB/s bidirectional (18 links)", 0.8),
    Link(
        "nvlink4-h800",
        200 * GB,
        3 * US,
        "NVIDIA H800 SXM: NVLink 400 GB/s bidirectional; DeepSeek-V3 report Sec. 3.2.2 measures ~160 GB/s",
        0.8,
    ),
    Link("nvlink5", 900 * GB, 3 * US, "NVIDIA Blackwell datasheet: NVLink 1.8 TB/s bidirectional", 0.8),
    Link(
        "ib-hdr", 25 * GB, 5 * US, "InfiniBand HDR 200 Gb/s per GPU (DGX A100 / Selene: 8 HCAs per node)", 0.9
    ),
    Link("ib-ndr", 50 * GB, 5 * US, "InfiniBand NDR 400 Gb/s per GPU (DGX H100: 8 ConnectX-7)", 0.9),
    Link(
        "ib-xdr", 100 * GB, 5 * US, "InfiniBand XDR 800 Gb/s per GPU (NVIDIA Quantum-X800, ConnectX-8)", 0.9
    ),
    Link(
        "roce-400",
        50 * GB,
        8 * US,
        "RoCEv2 400 GbE per GPU (e.g. Meta's Llama 3 cluster, Dubey et al. 2024)",
        0.75,
    ),
    Link(
        "omnipath-100",
        12.5 * GB,
        5 * US,
        "Intel Omni-Path 100 Gb/s (Jean Zay, BLOOM: 4 links per 8-GPU node)",
        0.9,
    ),
    # Where ZeRO-Offload and ZeRO-Infinity put the optimizer states, per GPU of an 8-GPU node:
    Link(
        "host-dram",
        40 * GB,
        1 * US,
        "DGX H100: 2 Xeon 8480C, 8 DDR5-4800 channels each = 614 GB/s per node, "
        "about half reached by a CPU Adam (ZeRO-Offload, Ren et al. 2021, Sec. 5.1), / 8 GPUs",
        1.0,
    ),
    Link(
        "nvme",
        6 * GB,
        100 * US,
        "DGX H100 datasheet: 8x 3.84 TB NVMe U.2 (PCIe 4: ~6.8 GB/s read, ~4 GB/s "
        "write each), one per GPU; ZeRO-Infinity (Rajbhandari et al. 2021, Sec. 6) had DGX-2's ~25 GB/s per "
        "16 GPUs",
        0.9,
    ),
]:
    add_link(_l)

for _g in [
    GPU(
        "a100",
        312 * TFLOPS,
        80 * GB,
        2039 * GB,
        "nvlink3",
        "ib-hdr",
        8,
        "NVIDIA A100 80GB SXM datasheet: 312 TFLOPS bf16 dense, 80 GB HBM2e at 2,039 GB/s, 108 SMs",
        108,
        0.859,
        0.60,
        "dgx-a100",
    ),
    GPU(
        "h100",
        989 * TFLOPS,
        80 * GB,
        3350 * GB,
        "nvlink4",
        "ib-ndr",
        8,
        "NVIDIA H100 SXM datasheet: 1,979 TFLOPS bf16 with sparsity = 989 dense, 80 GB HBM3 at 3.35 TB/s, 132 SMs",
        132,
        0.801,
        0.60,
        "dgx-h100",
    ),
    GPU(
        "h200",
        989 * TFLOPS,
        141 * GB,
        4800 * GB,
        "nvlink4",
        "ib-ndr",
        8,
        "NVIDIA H200 SXM datasheet: 989 TFLOPS bf16 dense, 141 GB HBM3e at 4.8 TB/s (H100's die: 132 SMs)",
        132,
        0.801,
        0.60,
        "dgx-h100",
    ),
    GPU(
        "h800",
        989 * TFLOPS,
        80 * GB,
        3350 * GB,
        "nvlink4-h800",
        "ib-ndr",
        8,
        "NVIDIA H800 SXM: H100's compute and memory (989 TFLOPS bf16 dense, 80 GB at 3.35 TB/s) with NVLink "
        "cut to 400 GB/s bidirectional",
        132,
        0.801,
        0.60,
        "hgx-h800",
    ),
    GPU(
        "b200",
        2250 * TFLOPS,
        180 * GB,
        8000 * GB,
        "nvlink5",
        "ib-ndr",
        8,
        "NVIDIA HGX/DGX B200 datasheet: 4.5 PFLOPS bf16 with sparsity = 2.25 dense, 180 GB HBM3e at 8 TB/s, "
        "148 SMs; MAMF not yet published (Hopper's fraction assumed)",
        148,
        0.801,
        0.60,
        "dgx-b200",
    ),
    GPU(
        "gb200",
        2500 * TFLOPS,
        186 * GB,
        8000 * GB,
        "nvlink5",
        "ib-ndr",
        4,
        "NVIDIA GB200 NVL72 datasheet: 180 PFLOPS bf16 dense over 72 GPUs = 2.5 per GPU, 186 GB HBM3e at 8 TB/s; "
        "MAMF not yet published (Hopper's fraction assumed)",
        148,
        0.801,
        0.60,
        "gb200-nvl72",
    ),
]:
    add_gpu(_g)
