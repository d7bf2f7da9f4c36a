"""Mutation testing: plant one small semantic bug at a time and check that a test kills it.

    python scripts/mutants.py                 # every mutant, then a table (about 20 minutes on 2 cores)
    python scripts/mutants.py -k zero cp      # only mutants whose name contains one of these words
    python scripts/mutants.py --list          # what each mutant does, and its tests
    python scripts/mutants.py --clean -k tp   # first check that the selected tests pass unmutated
    python scripts/mutants.py -v -k cp        # and show how each failing test failed

A mutant is a scale factor, an order, a mask, an index or a sign of a strategy changed the way a
real bug would change it (a sum where a mean belongs, a gate left unnormalized, a warm-up one
step longer). Each names its file, the exact source it replaces (which must occur exactly once:
the script refuses to start otherwise, so a refactor that moves the code is noticed), the
replacement, and the tests that should catch it; those run with `-x`, and a mutant is *killed*
when one fails. The file is restored whatever happens (try/finally, with its original bytes and
modification time), and PYTHONDONTWRITEBYTECODE keeps a mutated module out of __pycache__.

Not part of CI: it reruns the named tests once per mutant. Run it after changing a strategy or
its tests; a survivor means the tests would pass that bug, so add a test that names what it checks.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    find: str  # exact source, present exactly once
    replace: str
    what: str  # the bug, in one line
    tests: list = field(default_factory=list)  # pytest node ids or files, fastest first


T_ZERO = "tests/test_zero.py"
T_FOUNDATION = "tests/test_foundation.py"
T_TP = "tests/test_tp.py"
T_CP = "tests/test_cp.py"
T_MOE = "tests/test_moe.py"
T_PP = "tests/test_pp_runtime.py"
T_TRAIN = "tests/test_train.py"

MUTANTS = [
    # ---- the six of issue 15
    Mutant(
        "precision-never-unscales",
        "minipar/precision.py",
        "g.mul_(1.0 / self.scale_value)",
        "g.mul_(1.0)",
        "the fp16 path never unscales the gradients before the step",
        [
            f"{T_ZERO}::test_bf16_and_fp16_with_loss_scaling_match_fp32_within_their_precision",
            f"{T_ZERO}::test_the_step_after_an_overflow_uses_the_halved_scale",
        ],
    ),
    Mutant(
        "optim-replicas-divided-by-dp-alone",
        "minipar/optim.py",
        "scale=1.0 / (pc.dp * pc.ep * pc.cp))",
        "scale=1.0 / pc.dp)",
        "the composed optimizer (ZeRO-0) divides replica gradients by dp alone instead of dp·cp·ep",
        [
            f"{T_TRAIN}::test_more_layouts_match_gradient_by_gradient[tp2 cp2 ulysses]",
            f"{T_TRAIN}::test_parameters_after_sgd_steps_match_tightly[moe ep2 dp2]",
        ],
    ),
    Mutant(
        "moe-softmax-topk-unnormalized",
        "minipar/moe.py",
        'if kind == "sigmoid" or k > 1:',
        'if kind == "sigmoid":',
        "softmax top-k routing without renormalizing the k gates",
        [f"{T_MOE}::test_moe_layer_equals_the_papers_dispatch_and_combine"],
    ),
    Mutant(
        "zero-reduce-scatter-sums",
        "minipar/zero.py",
        'u.rs_handles.append(comm.reduce_scatter(full, op="avg"',
        'u.rs_handles.append(comm.reduce_scatter(full, op="sum"',
        "ZeRO-2/3's reduce-scatter sums the gradients instead of averaging them",
        [f"{T_ZERO}::test_every_stage_matches_the_single_device_gradients_and_sgd_parameters[2]"],
    ),
    Mutant(
        "pp-1f1b-warmup-one-longer",
        "minipar/pp/schedules.py",
        "w = min(p - 1 - r, m)",
        "w = min(p - r, m)",
        "the 1F1B warm-up runs one forward more than p-1-r",
        ["tests/test_pp_schedules.py"],
    ),
    Mutant(
        "cp-merge-by-max",
        "minipar/cp.py",
        "lse = torch.logaddexp(lse_a, lse_b)",
        "lse = torch.maximum(lse_a, lse_b)",
        "the CP log-sum-exp merge replaced by a max",
        [f"{T_CP}::test_ring_and_ulysses_match_full_sdpa"],
    ),
    # ---- data parallelism and ZeRO
    Mutant(
        "optim-zero-replicas-not-divided",
        "minipar/optim.py",
        "g.mul_(1.0 / (pc.cp * pc.ep))",
        "g.mul_(1.0)",
        "the composed optimizer under ZeRO forgets to divide the cp and ep sums",
        [f"{T_TRAIN}::test_parameters_after_sgd_steps_match_tightly[zero2 tp2 sp cp2 dp2]"],
    ),
    Mutant(
        "zero1-reduce-scatter-sums",
        "minipar/zero.py",
        'u.flat_grad.to(self.mp.reduce_dtype), op="avg", group=self.group)',
        'u.flat_grad.to(self.mp.reduce_dtype), op="sum", group=self.group)',
        "ZeRO-1's reduce-scatter at the step sums instead of averaging",
        [f"{T_ZERO}::test_every_stage_matches_the_single_device_gradients_and_sgd_parameters[2]"],
    ),
    Mutant(
        "zero2-no-all-gather-after-step",
        "minipar/zero.py",
        "if self.stage < 3:  # in place",
        "if self.stage < 2:  # in place",
        "ZeRO-2 never all-gathers the stepped shards: every rank keeps stale parameters outside its shard",
        [f"{T_ZERO}::test_every_stage_matches_the_single_device_gradients_and_sgd_parameters[2]"],
    ),
    Mutant(
        "offload-master-not-copied-back",
        "minipar/offload.py",
        "                s.copy_(m, non_blocking=True)",
        "                pass",
        "CPU offload steps the host master but never copies it back to the device shard",
        [
            f"{T_ZERO}::test_our_zero3_matches_fsdp2_fully_shard",
            f"{T_ZERO}::test_every_stage_matches_the_single_device_gradients_and_sgd_parameters[2]",
        ],
    ),
    Mutant(
        "ddp-all-reduce-sums",
        "minipar/dp.py",
        'b.handle = comm.all_reduce(b.sent, op="avg"',
        'b.handle = comm.all_reduce(b.sent, op="sum"',
        "DDP sums the buckets instead of averaging them",
        [
            "tests/test_dp.py::test_buckets_overlap_backward_and_no_sync_communicates_only_the_last_micro_batch"
        ],
    ),
    Mutant(
        "ddp-buckets-in-registration-order",
        "minipar/dp.py",
        "for p in reversed(params):",
        "for p in params:",
        "DDP fills buckets in registration order, so the first bucket is ready last",
        [
            "tests/test_dp.py::test_buckets_overlap_backward_and_no_sync_communicates_only_the_last_micro_batch"
        ],
    ),
    Mutant(
        "ddp-no-sync-ignored",
        "minipar/dp.py",
        "            if not self.sync:\n                return\n",
        "            if False:\n                return\n",
        "no_sync() still all-reduces every micro-batch (same gradients, twice the traffic)",
        [
            "tests/test_dp.py::test_buckets_overlap_backward_and_no_sync_communicates_only_the_last_micro_batch"
        ],
    ),
    Mutant(
        "precision-skip-vote-by-min",
        "minipar/precision.py",
        'comm.all_reduce(bad, op="max", group=self.group)',
        'comm.all_reduce(bad, op="min", group=self.group)',
        "ranks skip an overflowed step only if all of them overflowed",
        [f"{T_ZERO}::test_the_step_after_an_overflow_uses_the_halved_scale"],
    ),
    # ---- tensor and sequence parallelism
    Mutant(
        "tp-row-bias-in-partial-sums",
        "minipar/tp.py",
        "        y = F.linear(x, self.weight)\n",
        "        y = F.linear(x, self.weight, self.bias)\n",
        "the row-parallel bias is added inside every rank's partial sum (t+1 times in all)",
        [f"{T_TP}::test_parity_with_reference_and_torch[2]"],
    ),
    Mutant(
        "tp-embedding-unmasked",
        "minipar/tp.py",
        "y = y.masked_fill(~mine[..., None], 0.0)",
        "y = y",
        "the vocab-parallel embedding does not zero the tokens another rank owns",
        [f"{T_TP}::test_parity_with_reference_and_torch[2]"],
    ),
    Mutant(
        "tp-cross-entropy-backward-unmasked",
        "minipar/tp.py",
        "local] -= mine.to(grad.dtype)",
        "local] -= 1.0",
        "the vocab-parallel loss's backward subtracts the one-hot on every rank, not only the target's owner",
        [f"{T_TP}::test_parity_with_reference_and_torch[2]"],
    ),
    Mutant(
        "tp-f-backward-not-reduced",
        "minipar/mappings.py",
        "return all_reduce(dy.contiguous().clone(), group=ctx.group), None",
        "return dy, None",
        "Megatron's f forgets its backward all-reduce (the forward is unchanged)",
        [f"{T_TP}::test_megatron_and_sp_operators", f"{T_TP}::test_parity_with_reference_and_torch[2]"],
    ),
    Mutant(
        "sp-partial-gradients-not-summed",
        "minipar/mappings.py",
        '    comm.all_reduce_grads([p for p in params if getattr(p, "sequence_parallel", False)], group)',
        "    return None",
        "under SP the LayerNorms' partial gradients (s/t tokens each) are never summed over tp",
        [f"{T_TP}::test_parity_with_reference_and_torch[2]"],
    ),
    Mutant(
        "sp-layernorm-statistics-not-split",
        "minipar/sp.py",
        "2 * B * s * b * h / split_norm + 2 * 2 * B * s * b / split_norm",
        "2 * B * s * b * h / split_norm + 2 * 2 * B * s * b",
        "the activation formula forgets that SP splits the LayerNorm statistics too (a < 5% term)",
        [f"{T_TP}::test_comm_and_activation_memory_match_formulas"],
    ),
    # ---- context parallelism
    Mutant(
        "cp-causal-diagonal-unmasked",
        "minipar/cp.py",
        "if not causal or a > b:",
        "if not causal or a >= b:",
        "ring attention computes diagonal chunk pairs without the causal mask",
        [f"{T_CP}::test_ring_and_ulysses_match_full_sdpa"],
    ),
    Mutant(
        "cp-backward-delta-sign",
        "minipar/cp.py",
        "ds = p * (dout @ v.transpose(-2, -1) - delta.unsqueeze(-1))",
        "ds = p * (dout @ v.transpose(-2, -1) + delta.unsqueeze(-1))",
        "ring attention's backward adds D = rowsum(dO∘O) instead of subtracting it",
        [f"{T_CP}::test_ring_and_ulysses_match_full_sdpa"],
    ),
    Mutant(
        "cp-loss-not-divided",
        "minipar/cp.py",
        "(loss / n).backward()",
        "loss.backward()",
        "each CP rank backpropagates its local mean, not local/cp: gradients cp times too large",
        [f"{T_CP}::test_gpt_with_cp_matches_reference_gradients_and_sgd_parameters[2]"],
    ),
    Mutant(
        "cp-traced-flops-halved",
        "minipar/cp.py",
        "flops=len(pairs) * 4 * q.shape[0]",
        "flops=len(pairs) * 2 * q.shape[0]",
        "the forward spans record half the FLOPs ring attention computes",
        [f"{T_CP}::test_bytes_and_flops_match_the_formulas"],
    ),
    # ---- mixture of experts and expert parallelism
    Mutant(
        "moe-capacity-without-k",
        "minipar/moe.py",
        "math.ceil(num_tokens * top_k * capacity_factor / num_experts)",
        "math.ceil(num_tokens * capacity_factor / num_experts)",
        "expert capacity forgets the k choices per token",
        [f"{T_MOE}::test_moe_layer_equals_the_papers_dispatch_and_combine"],
    ),
    Mutant(
        "moe-slots-token-major",
        "minipar/moe.py",
        "queue = onehot.transpose(-3, -2).flatten(-3, -2)",
        "queue = onehot.flatten(-3, -2)",
        "capacity slots handed out token by token instead of first choices first (GShard)",
        [
            f"{T_MOE}::test_assign_slots_matches_first_come_first_served",
            f"{T_MOE}::test_moe_layer_equals_the_papers_dispatch_and_combine",
        ],
    ),
    Mutant(
        "moe-aux-loss-without-E",
        "minipar/moe.py",
        "return alpha * E * (f * P).sum(-1).mean()",
        "return alpha * (f * P).sum(-1).mean()",
        "Switch's aux loss without its factor E",
        [f"{T_MOE}::test_moe_layer_equals_the_papers_dispatch_and_combine"],
    ),
    Mutant(
        "moe-bias-in-the-gates",
        "minipar/moe.py",
        "weights = scores.gather(-1, index)",
        "weights = select.gather(-1, index)",
        "the aux-loss-free bias leaks into the gate weights (DeepSeek-V3 uses it for the choice only)",
        [f"{T_MOE}::test_expert_parallel_equals_the_papers_single_device_layer"],
    ),
    Mutant(
        "ep-expert-gradients-over-dp-only",
        "minipar/ep.py",
        '"dp", 1.0 / shards)',
        '"dp", 1.0 / mesh.size("dp"))',
        "expert gradients divided by dp instead of dp·ep",
        [f"{T_MOE}::test_expert_parallel_equals_the_papers_single_device_layer"],
    ),
    Mutant(
        "ep-results-not-unsorted",
        "minipar/ep.py",
        "out = out[torch.argsort(by_expert)]",
        "out = out",
        "expert outputs go back in expert order, not in the (source rank, expert) order they arrived in",
        [f"{T_MOE}::test_expert_parallel_equals_the_papers_single_device_layer"],
    ),
    Mutant(
        "comm-all-to-all-wire-counts-own-rows",
        "minipar/comm.py",
        "wire = S - own",
        "wire = S",
        "the trace's all-to-all wire bytes count the rows that stay on the rank",
        [f"{T_MOE}::test_all_to_all_bytes_handed_to_the_backend_are_the_rows_routing_sends"],
    ),
    # ---- the launcher
    Mutant(
        "runtime-deadline-counts-the-rendezvous",
        "minipar/watchdog.py",
        "    started = max(joined)",
        "    pass",
        "the deadline counts from the fork: a slow start is charged to the launched function",
        [f"{T_FOUNDATION}::test_a_slow_rendezvous_is_not_charged_to_the_deadline"],
    ),
    Mutant(
        "runtime-store-failure-not-retried",
        "minipar/runtime.py",
        "raise RendezvousFailed(-1, traceback.format_exc()) from None",
        "raise",
        "a rendezvous store that fails to start ends the launch instead of starting over",
        [f"{T_FOUNDATION}::test_a_rendezvous_store_that_fails_to_start_is_retried"],
    ),
    # ---- pipelines
    Mutant(
        "pp-loss-not-divided-by-microbatches",
        "minipar/pp/runtime.py",
        "self.loss_scale = 1.0 / schedule.num_microbatches",
        "self.loss_scale = 1.0",
        "micro-batch losses are not divided by m: gradients m times too large",
        [f"{T_PP}::test_parity_with_reference"],
    ),
    Mutant(
        "pp-dualpipe-copies-not-summed",
        "minipar/pp/runtime.py",
        "            comm.all_reduce_grads(ps, group=mirror[rank])",
        "            pass",
        "DualPipe's two copies of a layer slice never sum their gradients",
        [f"{T_PP}::test_parity_with_reference[dualpipe]"],
    ),
    Mutant(
        "pp-interleaved-warmup-short",
        "minipar/pp/schedules.py",
        "w = min((v - 1) * p + 2 * (p - 1 - r), total)",
        "w = min((v - 1) * p + (p - 1 - r), total)",
        "interleaved 1F1B warms up with p-1-r forwards too few",
        [
            "tests/test_pp_schedules.py::test_interleaved_warmup_hides_the_transfers_and_bounds_the_activations",
            "tests/test_pp_schedules.py",
        ],
    ),
    # ---- collectives, checkpoints, FP8, serving
    Mutant(
        "ring-reduce-scatter-wrong-chunk",
        "minipar/collectives/ring.py",
        "send, recv_i = chunks[(r - s - 1) % n], (r - s - 2) % n",
        "send, recv_i = chunks[(r - s - 1) % n], (r - s - 1) % n",
        "the ring reduce-scatter adds the incoming partial sum into the chunk it just sent",
        ["tests/test_collectives.py"],
    ),
    Mutant(
        "checkpoint-shards-reversed",
        "minipar/checkpoint.py",
        "box = tuple((index * size, (index + 1) * size) if d == dim",
        "box = tuple(((parts - 1 - index) * size, (parts - index) * size) if d == dim",
        "a TP shard is filed under the mirror-image block of the full tensor",
        ["tests/test_checkpoint.py"],
    ),
    Mutant(
        "fp8-scale-rounded-up",
        "minipar/fp8.py",
        "return 2.0 ** math.floor(math.log2(",
        "return 2.0 ** math.ceil(math.log2(",
        "the FP8 scale is rounded up, so the tensor's amax saturates",
        ["tests/test_fp8.py"],
    ),
    Mutant(
        "serve-kv-slots-overlap",
        "minipar/serve/blocks.py",
        "return [table[p // block_size] * block_size + p % block_size",
        "return [table[p // block_size] + p % block_size",
        "the paged KV cache forgets to multiply a block's index by the block size",
        ["tests/test_serve.py::test_paged_logits_match_the_reference", "tests/test_serve.py"],
    ),
]


def check(mutants) -> None:
    """Refuse to start unless every snippet occurs exactly once in its file."""
    bad = []
    for m in mutants:
        path = os.path.join(ROOT, m.file)
        if not os.path.exists(path):
            bad.append(f"{m.name}: {m.file} does not exist")
            continue
        n = open(path, encoding="utf-8").read().count(m.find)
        if n != 1:
            bad.append(f"{m.name}: the snippet occurs {n} times in {m.file} (must be once): {m.find!r}")
    if bad:
        sys.exit(
            "mutants.py: fix the mutant list first (was the code moved? `git diff` the file if a run was "
            "killed):\n  " + "\n  ".join(bad)
        )


def run_tests(tests, timeout: float) -> tuple[int, str, float]:
    env = dict(
        os.environ,
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        PYTHONDONTWRITEBYTECODE="1",
    )
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return -1, out, time.perf_counter() - t0


def first_failure(output: str) -> str:
    m = re.search(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", output, re.M)  # node ids may hold spaces
    if m:
        return m.group(1)
    m = re.search(r"^(\S+\.py)::\S+ (?:FAILED|ERROR)", output, re.M)
    return m.group(1) if m else "?"


def mutate_and_test(m: Mutant, timeout: float) -> dict:
    path = os.path.join(ROOT, m.file)
    with open(path, "rb") as f:
        original = f.read()
    st = os.stat(path)
    try:
        with open(path, "wb") as f:
            f.write(original.replace(m.find.encode(), m.replace.encode(), 1))
        rc, out, secs = run_tests(m.tests, timeout)
    finally:
        with open(path, "wb") as f:
            f.write(original)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    why = [line for line in out.splitlines() if line.startswith("E ")][:4]
    if rc == 0:
        return dict(result="SURVIVED", by="", secs=secs)
    if rc == -1:
        return dict(result="killed", by=f"(timeout {timeout:.0f} s)", secs=secs)
    if rc in (2, 3, 4):  # interrupted, internal error, usage: the tests did not run as asked
        return dict(
            result="ERROR", by=out.strip().splitlines()[-1] if out.strip() else f"pytest exit {rc}", secs=secs
        )
    return dict(result="killed", by=first_failure(out), secs=secs, why=why)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", nargs="*", default=[], help="only mutants whose name contains one of these words")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument(
        "--clean", action="store_true", help="first run the selected tests unmutated; stop if they fail"
    )
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutant's tests [600]")
    ap.add_argument(
        "-v", "--verbose", action="store_true", help="print the first lines of each failure's error"
    )
    a = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not a.k or any(w in m.name for w in a.k)]
    if not chosen:
        sys.exit(f"no mutant matches {a.k}; see --list")
    check(chosen)
    if a.list:
        for m in chosen:
            print(f"{m.name}\n    {m.file}: {m.what}\n    tests: {' '.join(m.tests)}")
        return 0
    if a.clean:
        tests = list(dict.fromkeys(t for m in chosen for t in m.tests))
        rc, out, secs = run_tests(tests, a.timeout * len(chosen))
        if rc != 0:
            print(out[-3000:])
            sys.exit(f"the selected tests fail without any mutant ({first_failure(out)}): fix that first")
        print(f"clean: the selected tests pass unmutated ({secs:.0f} s)")
    rows, t0 = [], time.perf_counter()
    for i, m in enumerate(chosen, 1):
        r = mutate_and_test(m, a.timeout)
        rows.append((m, r))
        print(f"[{i}/{len(chosen)}] {m.name}: {r['result']} {r['by']} ({r['secs']:.0f} s)", flush=True)
        if a.verbose:
            print("".join(f"      {line[:200]}\n" for line in r.get("why", [])), end="", flush=True)
    width = max(len(m.name) for m, _ in rows)
    print(f"\n{'mutant':<{width}}  {'result':<8}  {'seconds':>7}  by")
    for m, r in rows:
        print(f"{m.name:<{width}}  {r['result']:<8}  {r['secs']:>7.0f}  {r['by']}")
    killed = sum(r["result"] == "killed" for _, r in rows)
    print(f"\n{killed}/{len(rows)} killed in {time.perf_counter() - t0:.0f} s")
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
