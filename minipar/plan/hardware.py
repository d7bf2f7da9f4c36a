"""A hardware table: GPUs and the links between them. Add your own with `add_gpu` / `add_link`.

Numbers are vendor peak figures for dense bf16 math (no 2:4 sparsity) and per-GPU,
per-direction link bandwidth; each entry cites its datasheet. Latencies are the
per-message software+wire latency a ring step pays, order of magnitude from
nccl-tests small-message timings; they matter only for small messages.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GPU", "Link", "GPUS", "LINKS", "add_gpu", "add_link", "get_gpu", "get_link"]


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float       # bytes/s per GPU per direction
    latency: float         # seconds per message (one ring step)
    source: str = ""


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float      # dense bf16 FLOP/s
    memory: float          # bytes of HBM
    memory_bandwidth: float  # HBM bytes/s
    intra_node: str        # link name between GPUs of one node
    inter_node: str        # default link name between nodes (one NIC per GPU)
    gpus_per_node: int = 8
    source: str = ""


GB, TFLOPS, US = 1e9, 1e12, 1e-6

LINKS: dict[str, Link] = {}
GPUS: dict[str, GPU] = {}


def add_link(link: Link) -> Link:
    """Register (or replace) a link so `estimate(..., inter_node="name")` can use it."""
    if link.bandwidth <= 0 or link.latency < 0:
        raise ValueError(f"link {link.name!r}: bandwidth must be > 0 and latency >= 0")
    LINKS[link.name.lower()] = link
    return link


def add_gpu(gpu: GPU) -> GPU:
    """Register (or replace) a GPU so `estimate(..., gpu="name")` can use it."""
    if gpu.peak_flops <= 0 or gpu.memory <= 0 or gpu.memory_bandwidth <= 0 or gpu.gpus_per_node < 1:
        raise ValueError(f"gpu {gpu.name!r}: peak_flops, memory, memory_bandwidth and gpus_per_node must be positive")
    for ln in (gpu.intra_node, gpu.inter_node):
        if ln.lower() not in LINKS:
            raise ValueError(f"gpu {gpu.name!r} names link {ln!r}; add it first with add_link. "
                             f"Known links: {sorted(LINKS)}")
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
    Link("pcie5", 64 * GB, 5 * US, "PCI-SIG PCIe 5.0: 32 GT/s x16 = 64 GB/s per direction"),
    Link("nvlink3", 300 * GB, 3 * US, "NVIDIA A100 datasheet: NVLink 600 GB/s bidirectional (12 links)"),
    Link("nvlink4", 450 * GB, 3 * US, "NVIDIA H100 datasheet: NVLink 900 GB/s bidirectional (18 links)"),
    Link("nvlink5", 900 * GB, 3 * US, "NVIDIA Blackwell datasheet: NVLink 1.8 TB/s bidirectional"),
    Link("ib-hdr", 25 * GB, 5 * US, "InfiniBand HDR 200 Gb/s per GPU (DGX A100 / Selene: 8 HCAs per node)"),
    Link("ib-ndr", 50 * GB, 5 * US, "InfiniBand NDR 400 Gb/s per GPU (DGX H100: 8 ConnectX-7)"),
    Link("ib-xdr", 100 * GB, 5 * US, "InfiniBand XDR 800 Gb/s per GPU (NVIDIA Quantum-X800, ConnectX-8)"),
    Link("roce-400", 50 * GB, 8 * US, "RoCEv2 400 GbE per GPU (e.g. Meta's Llama 3 cluster, Dubey et al. 2024)"),
]:
    add_link(_l)

for _g in [
    GPU("a100", 312 * TFLOPS, 80 * GB, 2039 * GB, "nvlink3", "ib-hdr", 8,
        "NVIDIA A100 80GB SXM datasheet: 312 TFLOPS bf16 dense, 80 GB HBM2e at 2,039 GB/s"),
    GPU("h100", 989 * TFLOPS, 80 * GB, 3350 * GB, "nvlink4", "ib-ndr", 8,
        "NVIDIA H100 SXM datasheet: 1,979 TFLOPS bf16 with sparsity = 989 dense, 80 GB HBM3 at 3.35 TB/s"),
    GPU("h200", 989 * TFLOPS, 141 * GB, 4800 * GB, "nvlink4", "ib-ndr", 8,
        "NVIDIA H200 SXM datasheet: 989 TFLOPS bf16 dense, 141 GB HBM3e at 4.8 TB/s"),
    GPU("b200", 2250 * TFLOPS, 180 * GB, 8000 * GB, "nvlink5", "ib-xdr", 8,
        "NVIDIA HGX/DGX B200 datasheet: 4.5 PFLOPS bf16 with sparsity = 2.25 dense, 180 GB HBM3e at 8 TB/s"),
]:
    add_gpu(_g)
