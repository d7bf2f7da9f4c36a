"""N-D composition against the single-device reference: every gradient after the first backward
(gathered to full shape), the loss curve, and the parameters after SGD steps; resharding
checkpoints; torch's FSDP + DTensor TP; the command; bad configurations."""

import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace

import pytest
import torch

from minipar import runtime
from minipar.bench.tp import _run_2d  # torch's side of the FSDP + TP benchmark
from minipar.model import GPT, train_reference
from minipar.train import configs, main, parse_args, train_rank

SMALL = ["--layers", "4", "--hidden", "32", "--heads", "4", "--seq", "16", "--vocab", "32", "--batch", "16"]


@dataclass
class Run:
    losses: list
    grads: dict  # name -> the first step's gradient, full shape, averaged over every replica
    params: dict  # name -> final value, full shape
    cfg: object
    rc: object
    out: list  # every rank's result


def run(flags, steps=20) -> Run:
    """Self-launched run. A resumed run's losses include the curve its checkpoint carried; its
    gradients are those of its first step after the checkpoint."""
    cfg, pc, rc = configs(parse_args(SMALL + flags + ["--steps", str(steps)]))
    rc = replace(rc, capture=True)
    out = runtime.launch(train_rank, pc.world_size, cfg, pc, rc, 0, rc.resume, timeout=180)
    grads, params = {}, {}
    for o in out:
        grads.update(o["first_grads"])
        params.update(o["params"])
    return Run(out[0]["losses"], grads, params, cfg, rc, out)


@functools.lru_cache(maxsize=None)
def reference(cfg, steps, batch, seed, kind="adamw"):
    return train_reference(cfg, steps=steps, batch_size=batch, seed=seed, kind=kind)


def ref_losses(cfg, rc):
    return reference(cfg, rc.steps, rc.batch, rc.seed).losses


def close(xs, ys, tol=1e-4):
    return max(abs(x - y) for x, y in zip(xs, ys)) <= tol


def assert_gradients_match(r: Run, at_step: int = 1, tol: float = 1e-5):
    """Every parameter's gradient of step `at_step` against the reference's, relative to the largest
    entry of that gradient. A scale bug (a sum that should be a mean, a missing replica) fails here
    even where AdamW would hide it from the loss curve."""
    ref = reference(r.cfg, at_step, r.rc.batch, r.rc.seed, r.rc.optimizer).grads
    names = [n for n, _ in GPT(r.cfg).named_parameters()]
    # A gradient that is zero in exact arithmetic (a key bias: softmax ignores a constant added to
    # every key) is fp32 rounding of sums whose terms are as large as the model's gradients: allow
    # 1e-7 of the largest gradient entry anywhere (a few fp32 ulps of it) on top of the relative bound.
    scale = max(g.abs().max().item() for g in ref.values())
    for n in names:
        assert n in r.grads, f"{n}: no rank returned its gradient"
        want = ref.get(n, torch.zeros_like(r.grads[n]))  # an expert that got no token has none
        diff = (r.grads[n] - want).abs().max().item()
        assert diff <= tol * want.abs().max().item() + 1e-7 * scale, (n, diff, want.abs().max().item())


def assert_matches(r: Run, loss_tol: float = 2e-5):
    assert_gradients_match(r)
    assert close(r.losses, ref_losses(r.cfg, r.rc), loss_tol), (r.losses, ref_losses(r.cfg, r.rc))


@pytest.mark.parametrize(
    "flags",
    [
        ["--dp", "2", "--pp", "2", "--tp", "2", "--zero", "1", "--schedule", "1f1b", "--microbatches", "4"],
        [
            "--dp",
            "2",
            "--pp",
            "1",
            "--tp",
            "2",
            "--ep",
            "2",
            "--experts",
            "4",
            "--zero",
            "1",
            "--microbatches",
            "1",
        ],
        ["--dp", "2", "--pp", "1", "--tp", "2", "--cp", "2", "--zero", "1", "--microbatches", "2"],
    ],
    ids=["tp2-pp2-dp2-zero1-1f1b", "moe-ep2-tp2-dp2", "cp2-tp2-dp2"],
)
def test_8_rank_layouts_reproduce_the_single_device_gradients_and_loss_curve(flags):
    r = run(flags, steps=10)  # the main job's 20-step curve is checked by the default-command test
    ref = ref_losses(r.cfg, r.rc)
    assert len(r.losses) == 10 and ref[-1] < ref[0] - 0.3  # it trains (the reference drops by 0.43)
    assert_matches(r, 1e-4)


MORE = {
    "tp4 sp": ["--dp", "1", "--pp", "1", "--tp", "4", "--sp", "--zero", "0"],
    "tp2 cp2 ulysses": [
        "--dp",
        "1",
        "--pp",
        "1",
        "--tp",
        "2",
        "--cp",
        "2",
        "--cp-method",
        "ulysses",
        "--zero",
        "0",
    ],
    "pp4 interleaved": [
        "--dp",
        "1",
        "--pp",
        "4",
        "--tp",
        "1",
        "--schedule",
        "interleaved_1f1b",
        "--chunks",
        "1",
        "--microbatches",
        "4",
        "--zero",
        "0",
    ],
    "dp2 pp2 zb_h1": ["--dp", "2", "--pp", "2", "--tp", "1", "--schedule", "zb_h1", "--microbatches", "4"],
    "dp2 tp2 sp recompute": [
        "--dp",
        "2",
        "--pp",
        "1",
        "--tp",
        "2",
        "--sp",
        "--recompute",
        "full",
        "--zero",
        "1",
    ],
    "llama3 4D pp2 tp2 cp2 sp": ["--dp", "1", "--pp", "2", "--tp", "2", "--cp", "2", "--sp", "--zero", "0"],
    "uneven stages 1,3": [
        "--dp",
        "2",
        "--pp",
        "2",
        "--tp",
        "1",
        "--stage-layers",
        "1,3",
        "--microbatches",
        "2",
    ],
    "dualpipe pp2 tp2": [
        "--dp",
        "1",
        "--pp",
        "2",
        "--tp",
        "2",
        "--schedule",
        "dualpipe",
        "--microbatches",
        "4",
    ],
    "fused adamw dp2 tp2": ["--dp", "2", "--pp", "1", "--tp", "2", "--fused-adamw"],
    # MoE: routing is discontinuous, so another summation order can flip a near-tied top-k choice;
    # MoE parity runs use seed 1, whose routing here has no near ties.
    "moe through a pipeline": [
        "--dp",
        "2",
        "--pp",
        "2",
        "--tp",
        "1",
        "--ep",
        "2",
        "--experts",
        "4",
        "--microbatches",
        "2",
        "--seed",
        "1",
    ],
    "moe zb_h1": [
        "--dp",
        "1",
        "--pp",
        "2",
        "--tp",
        "2",
        "--ep",
        "2",
        "--experts",
        "4",
        "--microbatches",
        "2",
        "--schedule",
        "zb_h1",
        "--seed",
        "1",
    ],
    "moe tp2 sp": ["--dp", "1", "--pp", "1", "--tp", "2", "--sp", "--experts", "4", "--seed", "1"],
    "moe cp2 ep2": [
        "--dp",
        "1",
        "--pp",
        "1",
        "--tp",
        "1",
        "--cp",
        "2",
        "--ep",
        "2",
        "--experts",
        "4",
        "--seed",
        "1",
    ],
}


@pytest.mark.parametrize("name", list(MORE))
def test_more_layouts_match_gradient_by_gradient(name):
    assert_matches(run(MORE[name], steps=4))


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags",
    [
        [
            "--dp",
            "2",
            "--pp",
            "2",
            "--ep",
            "2",
            "--cp",
            "2",
            "--tp",
            "1",
            "--experts",
            "4",
            "--microbatches",
            "2",
        ],
        [
            "--dp",
            "1",
            "--pp",
            "2",
            "--ep",
            "2",
            "--cp",
            "2",
            "--tp",
            "2",
            "--sp",
            "--experts",
            "4",
            "--microbatches",
            "2",
        ],
    ],
    ids=["5d dp2 pp2 ep2 cp2", "5d pp2 ep2 cp2 tp2 sp"],
)
def test_5d_on_16_ranks_matches_the_reference(flags):
    """DeepSeek-V3-style 5D on one mesh: experts over ep, attention over cp (and tp + SP), pipeline and
    data parallelism; each group's expert counts are summed over the ranks holding its tokens."""
    assert_matches(run(flags + ["--seed", "1"], steps=3))


@pytest.mark.parametrize(
    "flags",
    [
        ["--dp", "2", "--pp", "2", "--tp", "2", "--zero", "1", "--microbatches", "2"],
        ["--dp", "2", "--pp", "1", "--tp", "2", "--cp", "2", "--sp", "--zero", "2"],
        ["--dp", "4", "--pp", "1", "--tp", "1", "--zero", "3"],
        ["--dp", "2", "--pp", "1", "--tp", "1", "--ep", "2", "--experts", "4", "--zero", "0", "--seed", "1"],
    ],
    ids=["zero1 tp2 pp2 dp2", "zero2 tp2 sp cp2 dp2", "zero3 dp4", "moe ep2 dp2"],
)
def test_parameters_after_sgd_steps_match_tightly(flags):
    """Parameters after 3 SGD steps (no √v normalization, so no amplified rounding) equal the
    reference's within 1e-6 of each tensor's scale (+ 1e-8, below): a replica sum or scale that is wrong anywhere
    (dp, cp, ep, the SP sum over tp, ZeRO's shards) moves them."""
    r = run(flags + ["--optimizer", "sgd"], steps=3)
    ref = dict(reference(r.cfg, 3, r.rc.batch, r.rc.seed, "sgd").model.named_parameters())
    for n, want in ref.items():
        # 1e-8 absolute: lr (3e-3) x 3 steps x a gradient's fp32 rounding (~1e-6 of its O(1) entries);
        # it matters only for tensors that stay near zero (a key bias has no gradient at all)
        diff = (r.params[n] - want.detach()).abs().max().item()
        assert diff <= 1e-6 * want.abs().max().item() + 1e-8, (n, diff)


def test_zero_2_and_3_compose_with_tp_sp_cp_and_recompute():
    """ZeRO-2/3 (FSDP) over dp beside TP+SP, CP, PP and recompute: the single-device gradients and curve,
    and the model states ZeRO's table gives for this rank's Ψ (its TP slices): stage 3 holds (4 + 4 + 8)Ψ/dp
    in fp32 (Rajbhandari et al. 2020, Sec. 5), stage 2 the full parameters plus (4 + 8)Ψ/dp."""
    for flags in (
        ["--dp", "2", "--pp", "1", "--tp", "2", "--sp", "--zero", "3", "--microbatches", "2"],
        ["--dp", "2", "--pp", "1", "--tp", "1", "--cp", "2", "--zero", "2", "--microbatches", "2"],
        ["--dp", "4", "--pp", "1", "--tp", "1", "--zero", "3", "--recompute", "full"],
        # torchtitan's 3D: FSDP + TP + PP, each unit gathered for every micro-batch's F and B
        ["--dp", "2", "--pp", "2", "--tp", "2", "--sp", "--zero", "3", "--microbatches", "4"],
        [
            "--dp",
            "2",
            "--pp",
            "2",
            "--tp",
            "1",
            "--zero",
            "2",
            "--microbatches",
            "4",
            "--schedule",
            "gpipe",
            "--recompute",
            "full",
        ],
        # MoE: each block reduces at the end of backward (an expert may get no tokens), the dense
        # part of each shard then sums over ep (seed 1: routing without near ties, see above)
        ["--dp", "2", "--pp", "1", "--tp", "2", "--ep", "2", "--experts", "4", "--zero", "3", "--seed", "1"],
        [
            "--dp",
            "2",
            "--pp",
            "2",
            "--tp",
            "1",
            "--ep",
            "2",
            "--experts",
            "4",
            "--zero",
            "2",
            "--microbatches",
            "2",
            "--seed",
            "1",
        ],
    ):
        r = run(flags, steps=2)
        assert_matches(r)
        sb, dp = r.out[0]["state_bytes"], int(flags[flags.index("--dp") + 1])
        zero = int(flags[flags.index("--zero") + 1])
        assert (
            sb["padded"] % dp == 0 and sb["padded"] - sb["numel"] < 8 * dp
        )  # < one element per rank per unit
        shard = sb["padded"] // dp
        assert sb["grads"] == 4 * shard and sb["optimizer"] == 8 * shard, flags
        assert sb["params"] == (4 * shard if zero == 3 else 4 * sb["padded"]), flags


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_zero3_with_tp_matches_torch_fsdp2_with_dtensor_tp(sp):
    """Our --zero 3 --tp 2 --dp 2 against torchtitan's 2D with torch's own pieces: DTensor TP
    (parallelize_module) on the tp sub-mesh, FSDP2 fully_shard per block and at the root on the dp
    sub-mesh, vocab-parallel loss: the same first-step gradients, the same losses."""
    ours = run(["--dp", "2", "--pp", "1", "--tp", "2", "--zero", "3"] + (["--sp"] if sp else []), steps=4)
    theirs = runtime.launch(_run_2d, 4, ours.cfg, 4, ours.rc.batch, sp, False, 2, 2, timeout=120)[0]
    assert close(ours.losses, theirs["losses"], 1e-6), (ours.losses, theirs["losses"])
    scale = max(g.abs().max().item() for g in theirs["grads"].values())
    for n, g in theirs["grads"].items():  # the same bound as assert_gradients_match
        assert (ours.grads[n] - g).abs().max().item() <= 1e-5 * g.abs().max().item() + 1e-7 * scale, n
    assert_matches(ours)


def test_zero3_checkpoint_resumes_under_other_layouts(tmp_path):
    """AdamW: the resumed curve continues the uninterrupted one. SGD: the first gradients after the
    checkpoint equal the reference's at that step (after AdamW steps, the parameters would already
    carry Adam's amplified rounding, see test_parameters_after_sgd_steps_match_tightly)."""
    for kind in ("adamw", "sgd"):
        ck = str(tmp_path / kind)
        full = run(
            [
                "--dp",
                "2",
                "--pp",
                "2",
                "--tp",
                "2",
                "--zero",
                "3",
                "--microbatches",
                "2",
                "--save",
                ck,
                "--save-every",
                "2",
                "--optimizer",
                kind,
            ],
            steps=4,
        )
        for layout in (
            ["--dp", "1", "--pp", "1", "--tp", "1", "--zero", "0", "--microbatches", "2"],
            ["--dp", "4", "--pp", "1", "--tp", "1", "--zero", "2", "--microbatches", "2"],
        ):
            resumed = run(layout + ["--resume", ck, "--resume-step", "2", "--optimizer", kind], steps=4)
            assert resumed.losses[:2] == full.losses[:2] and close(
                resumed.losses[2:], full.losses[2:], 1e-5
            ), layout
            if kind == "sgd":
                assert_gradients_match(resumed, at_step=3)  # the first step after the checkpoint


def test_resharding_resume_continues_exactly(tmp_path):
    ck = str(tmp_path / "ck")
    full = run(
        ["--dp", "2", "--pp", "2", "--tp", "2", "--zero", "1", "--save", ck, "--save-every", "4"], steps=8
    )
    assert os.path.isdir(os.path.join(ck, "step_000004"))
    for layout in (
        ["--dp", "2", "--pp", "1", "--tp", "4", "--zero", "1"],  # tp4 x dp2
        ["--dp", "1", "--pp", "1", "--tp", "1", "--zero", "0"],
    ):  # one device
        resumed = run(layout + ["--resume", ck, "--resume-step", "4"], steps=8)
        assert len(resumed.losses) == 8 and resumed.losses[:4] == full.losses[:4]  # from the checkpoint
        assert close(resumed.losses[4:], full.losses[4:], 1e-5), (layout, resumed.losses, full.losses)


BAD = [
    (["--dp", "3", "--pp", "1", "--tp", "1"], "--batch 16 must split into dp*ep=3"),
    (["--tp", "3"], "must be divisible by --tp=3"),
    (["--dp", "1", "--pp", "1", "--tp", "1", "--ep", "2"], "needs an MoE model"),
    (["--dp", "1", "--pp", "1", "--tp", "1", "--cp", "3"], "--seq 16 must be divisible by --cp=6"),
    (["--dp", "1", "--pp", "1", "--tp", "2", "--cp", "4", "--cp-method", "ulysses"], "Ulysses"),
    (["--dp", "1", "--pp", "8", "--tp", "1", "--layers", "4"], "layers=4 cannot fill 8 model parts"),
    (
        ["--dp", "1", "--pp", "2", "--tp", "1", "--schedule", "dualpipe", "--microbatches", "2"],
        "--schedule 'dualpipe'",
    ),
    (["--dp", "1", "--pp", "2", "--tp", "1", "--microbatches", "3"], "micro-batches"),
    (
        ["--dp", "1", "--pp", "1", "--tp", "1", "--experts", "3", "--ep", "2"],
        "experts=3 cannot be split evenly",
    ),
    (
        ["--dp", "1", "--pp", "2", "--tp", "1", "--schedule", "nonsense"],
        "--schedule 'nonsense' is not one of",
    ),
    (["--dp", "2", "--pp", "1", "--tp", "1", "--zero", "4"], "--zero 4 is not one of"),
    (
        ["--dp", "2", "--pp", "2", "--tp", "1", "--zero", "3", "--microbatches", "2", "--schedule", "zb_h1"],
        "I/W split",
    ),
]


@pytest.mark.parametrize("flags,message", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_configurations_fail_clearly_before_any_process_starts(flags, message, monkeypatch, capsys):
    def no_launch(*a, **k):
        raise AssertionError("a process was started for a bad configuration")

    monkeypatch.setattr(runtime, "launch", no_launch)
    assert main(SMALL + flags) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert all(line.startswith("error: ") for line in err.splitlines()), err  # one line per problem


def test_every_problem_is_listed_at_once():
    with pytest.raises(ValueError) as e:
        configs(parse_args(SMALL + ["--dp", "3", "--tp", "3", "--sp", "--cp", "3"]))
    assert str(e.value).count("\n  - ") >= 3


def test_help_explains_every_flag():
    out = subprocess.run(
        [sys.executable, "-m", "minipar.train", "--help"], capture_output=True, text=True
    ).stdout
    for flag in (
        "--dp",
        "--pp",
        "--tp",
        "--cp",
        "--ep",
        "--zero",
        "--schedule",
        "--microbatches",
        "--steps",
        "--seed",
        "--layers",
        "--hidden",
        "--heads",
        "--seq",
        "--vocab",
        "--batch",
        "--metrics",
        "--save",
        "--resume",
    ):
        assert flag in out


def test_default_command_runs_writes_metrics_trace_and_timeline(tmp_path):
    metrics = tmp_path / "m.jsonl"
    rc = main(["--out", str(tmp_path), "--metrics", str(metrics)])
    assert rc == 0  # includes the comparison with the single-device loop
    rows = [json.loads(l) for l in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert all(len(r["peak_mem_mb"]) == 8 and r["tokens_per_s"] > 0 for r in rows)
    assert os.path.getsize(tmp_path / "timeline.png") > 10_000
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert {e["pid"] for e in trace["traceEvents"] if e["ph"] == "X"} == set(range(8))


def test_torchrun_gives_the_same_losses_as_the_self_launched_run(tmp_path):
    # two processes keep it short (each imports torch); tp2 sends every layer's all-reduces through torchrun's group
    flags = SMALL + "--dp 1 --pp 1 --tp 2 --steps 3 --no-check".split() + ["--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "minipar.train",
        *flags,
        "--metrics",
        str(tmp_path / "torchrun.jsonl"),
    ]
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=300)
    assert main(flags + ["--metrics", str(tmp_path / "self.jsonl")]) == 0
    a, b = ([json.loads(l)["loss"] for l in open(tmp_path / f)] for f in ("torchrun.jsonl", "self.jsonl"))
    assert len(a) == 3 and a == b
