"""Clusters as the collectives see them: NVLink domains, NICs, the fabric, SHARP.

A `Topology` says how GPUs are wired:

* `domain` GPUs share one NVLink/NVSwitch fabric (8 in a DGX/HGX node; 72 in a GB200
  NVL72 rack, whose 18 trays of 4 GPUs share the NVLink switches);
* each host of `gpus_per_node` GPUs has `nics_per_node` NICs of the `nic` link (InfiniBand
  NDR/XDR, RoCE, ...; the link carries the fabric's own efficiency), so a GPU's share of the
  scale-out network is nics_per_node x bandwidth / gpus_per_node;
* `sharp`: the switches reduce in the network (NVIDIA SHARP), so an all-reduce across nodes
  sends each byte once instead of twice: half the bytes a rank sends in a ring all-reduce
  (Graham et al. 2016, "Scalable Hierarchical Aggregation Protocol").

**Collective cost.** A group of k ranks whose consecutive members sit `stride` GPUs apart
(the product of the mesh axes inside it; tp is innermost) has k_in = domain / stride of its
members in each NVLink domain. Its time is the α-β cost (Thakur, Rabenseifner & Gropp 2005):
steps x latency + bytes / (bandwidth x efficiency), with (steps, bytes) from `alpha_beta`:

* inside one domain: all-reduce by ring or tree, whichever the α-β model says is faster
  (what NCCL's tuner does: it models each algorithm's time and takes the minimum);
  all-gather and reduce-scatter by ring; all-to-all by pairwise exchange;
* across domains, hierarchically (NCCL's and Horovod's 2D algorithm): reduce-scatter inside
  the domain, then the k_in ranks of a domain each run the inter-domain collective on 1/k_in
  of the data over their own NIC share, in parallel, then all-gather inside the domain;
* an all-to-all across domains sends (k_in - 1)/k of its bytes over NVLink and the rest over
  the NICs, at the same time; the slower part sets the time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..collectives import alpha_beta
from .hardware import Link, get_link, lookup

__all__ = ["Topology", "TOPOLOGIES", "add_topology", "get_topology", "collective_time", "placement"]


@dataclass(frozen=True)
class Topology:
    name: str
    gpus_per_node: int  # GPUs per host (they share its NICs)
    domain: int  # GPUs on one NVLink/NVSwitch fabric
    nvlink: str  # link name inside the domain
    nic: str  # link name of one NIC (the fabric)
    nics_per_node: int
    sharp: bool = False  # in-network reduction on the scale-out switches
    source: str = ""

    @property
    def intra(self) -> Link:
        return get_link(self.nvlink)

    @property
    def inter(self) -> Link:
        """One GPU's share of the scale-out network, as a link."""
        nic = get_link(self.nic)
        share = nic.bandwidth * self.nics_per_node / self.gpus_per_node
        return Link(
            f"{nic.name}x{self.nics_per_node}/{self.gpus_per_node}" if share != nic.bandwidth else nic.name,
            share,
            nic.latency,
            nic.source,
            nic.efficiency,
        )


TOPOLOGIES: dict[str, Topology] = {}


def add_topology(t: Topology) -> Topology:
    if t.gpus_per_node < 1 or t.domain < 1 or t.nics_per_node < 1:
        raise ValueError(f"topology {t.name!r}: gpus_per_node, domain and nics_per_node must be >= 1")
    get_link(t.nvlink), get_link(t.nic)  # both must exist
    TOPOLOGIES[t.name.lower()] = t
    return t


def get_topology(t) -> Topology:
    return lookup(
        TOPOLOGIES, t, Topology, "topology", "register yours with minipar.plan.add_topology(Topology(...))"
    )


for _t in [
    Topology(
        "dgx-a100",
        8,
        8,
        "nvlink3",
        "ib-hdr",
        8,
        False,
        "DGX A100 / Selene: 8 A100 on NVSwitch, 8 HDR 200 Gb/s HCAs (Narayanan et al. 2021, Sec. 5)",
    ),
    Topology(
        "jean-zay-a100",
        8,
        8,
        "nvlink3",
        "omnipath-100",
        4,
        False,
        "Jean Zay (BLOOM-176B): 8 A100 80GB per node, 4 Omni-Path 100 Gb/s links (BigScience 2022)",
    ),
    Topology(
        "dgx-h100",
        8,
        8,
        "nvlink4",
        "ib-ndr",
        8,
        False,
        "DGX H100: 8 H100 on NVSwitch, 8 ConnectX-7 NDR 400 Gb/s (DGX H100 datasheet)",
    ),
    Topology(
        "dgx-h100-sharp",
        8,
        8,
        "nvlink4",
        "ib-ndr",
        8,
        True,
        "DGX H100 on Quantum-2 switches with SHARPv3 in-network reduction",
    ),
    Topology(
        "h100-roce",
        8,
        8,
        "nvlink4",
        "roce-400",
        8,
        False,
        "Meta Grand Teton: 8 H100 on NVLink, one 400 Gb/s RoCE NIC per GPU (Dubey et al. 2024, Sec. 3.3.1)",
    ),
    Topology(
        "hgx-h800",
        8,
        8,
        "nvlink4-h800",
        "ib-ndr",
        8,
        False,
        "DeepSeek-V3's cluster: 8 H800 on NVLink, 8 InfiniBand 400 Gb/s NICs per node (DeepSeek-V3 report, Sec. 3.1)",
    ),
    Topology(
        "dgx-b200",
        8,
        8,
        "nvlink5",
        "ib-ndr",
        8,
        False,
        "DGX B200: 8 B200 on NVLink 5, 8 ConnectX-7 400 Gb/s (DGX B200 datasheet)",
    ),
    Topology(
        "gb200-nvl72",
        4,
        72,
        "nvlink5",
        "ib-ndr",
        4,
        False,
        "GB200 NVL72: 72 Blackwell GPUs in one NVLink domain (18 trays of 4), one 400 Gb/s ConnectX-7 per GPU "
        "(GB200 NVL72 datasheet)",
    ),
]:
    add_topology(_t)


def placement(size: int, stride: int, topo: Topology) -> tuple[int, int]:
    """(members per NVLink domain, domains spanned) of a group of `size` ranks whose
    consecutive members are `stride` GPUs apart (mesh order: tp innermost)."""
    k_in = 1 if stride >= topo.domain else max(1, min(size, topo.domain // stride))
    return k_in, math.ceil(size / k_in)


def _time(link: Link, steps: int, nbytes: float) -> float:
    return steps * link.latency + nbytes / (link.bandwidth * link.efficiency)


def _flat(op: str, n: int, nbytes: float, link: Link, sharp: bool = False) -> tuple[float, str]:
    """Seconds and algorithm of one collective over n ranks on one kind of link."""
    if n <= 1 or nbytes <= 0:
        return 0.0, "none"
    if op == "all_to_all":
        return _time(link, *alpha_beta("pairwise", op, n, nbytes)), "pairwise"
    if op != "all_reduce":
        return _time(link, *alpha_beta("ring", op, n, nbytes)), "ring"
    if sharp:  # the switch reduces: each rank sends its data once (half a ring's bytes), two hops
        steps, sent = alpha_beta("ring", op, n, nbytes)
        return _time(link, 2, sent / 2), "sharp"
    ring = _time(link, *alpha_beta("ring", op, n, nbytes))
    tree = _time(link, *alpha_beta("tree", op, n, nbytes))
    return (ring, "ring") if ring <= tree else (tree, "tree")


def collective_time(op: str, nbytes: float, size: int, stride: int, topo) -> tuple[float, str]:
    """(seconds, how) of one `op` of `nbytes` (the whole logical tensor) over `size` ranks
    `stride` GPUs apart on `topo` (see the module docstring)."""
    topo = get_topology(topo)
    if size <= 1 or nbytes <= 0:
        return 0.0, "none"
    k_in, k_out = placement(size, stride, topo)
    nv, net = topo.intra, topo.inter
    if k_out == 1:
        t, how = _flat(op, size, nbytes, nv)
        return t, f"{how} on {nv.name}"
    if k_in == 1:
        t, how = _flat(op, size, nbytes, net, topo.sharp)
        return t, f"{how} on {net.name}"
    if op == "all_to_all":
        steps, _ = alpha_beta("pairwise", op, size, nbytes)
        t = steps * net.latency + max(
            (k_in - 1) / size * nbytes / (nv.bandwidth * nv.efficiency),
            (size - k_in) / size * nbytes / (net.bandwidth * net.efficiency),
        )
        return t, f"pairwise on {nv.name}+{net.name}"
    inner = {
        "all_reduce": ("reduce_scatter", "all_gather"),
        "reduce_scatter": ("reduce_scatter", None),
        "all_gather": (None, "all_gather"),
    }[op]
    t = sum(_flat(o, k_in, nbytes, nv)[0] for o in inner if o)
    t_out, how = _flat(op, k_out, nbytes / k_in, net, topo.sharp)
    return t + t_out, f"hierarchical: {'+'.join(o for o in inner if o)} on {nv.name}, {how} on {net.name}"
