"""Writing a class's grades: the CSV (a row per student) and a feedback file per student."""

from __future__ import annotations

import csv
import os

__all__ = ["write_csv", "write_feedback", "summary_line"]


def write_csv(path: str, results: dict, exercises: list[str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["student"] + [c for e in exercises for c in (e, f"{e} status")] + ["total", "out of"])
        for student in sorted(results):
            res = results[student]
            w.writerow(
                [student]
                + [c for e in exercises for c in (f"{res[e]['earned']:g}", res[e]["kind"])]
                + [
                    f"{sum(res[e]['earned'] for e in exercises):g}",
                    f"{sum(res[e]['points'] for e in exercises):g}",
                ]
            )


def write_feedback(folder: str, student: str, res: dict, seed: int) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{student}.txt")
    total, out_of = sum(r["earned"] for r in res.values()), sum(r["points"] for r in res.values())
    lines = [
        f"Feedback for {student}: {total:g} of {out_of:g} points",
        f"(randomized cases from seed {seed})",
        "",
    ]
    for name, r in res.items():
        lines += [f"== {name} ({r['file'] or 'no file'}): {r['earned']:g}/{r['points']:g}", r["text"]]
        for c in r["cases"]:
            mark = "ok " if c["passed"] else "-- "
            lines.append(
                f"   {mark}{c['earned']:5.2f}/{c['points']:.2f}  {c['name']}"
                + ("" if c["passed"] else f": {c['message'].splitlines()[0]}")
            )
        lines += [f"   note: {n}" for n in r.get("notes", [])] + [""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def summary_line(name, res, seconds) -> str:
    parts = [f"{e} {r['earned']:g}/{r['points']:g} {r['kind']}" for e, r in res.items()]
    total = sum(r["earned"] for r in res.values())
    out_of = sum(r["points"] for r in res.values())
    return f"{name}: {total:g}/{out_of:g} ({'; '.join(parts)}) in {seconds:.1f} s"
