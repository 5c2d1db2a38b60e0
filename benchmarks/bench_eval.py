"""The paper's evaluation tables in miniature, on the shared CIFAR-10 models and the 932 test images.

Sections (each a markdown table in the output, all numbers also in one JSON file and a final JSON line):

* ``table1``  end to end (paper Table 1): defenses none / Bi-Level / Fast Preemption x victims, PGD-20
  L-inf 8/255 and L2 0.5, AutoAttack standard on the first ``--aa-images``;
* ``fig9``    step ablation: F0-B3, F1-B2, F3-B0, F1-B1 (mspd preset), F0-B100, F100-B0;
* ``table7``  optimizer ablation: averaged FGSM vs averaged PGD samples, N = 1 vs N = 20;
* ``table5``  classifier ablation: ground truth vs cifar10-resnet18-std vs cifar10-resnet20-std;
* ``table2``  reversion protocol: white-box, black-box, JPEG-50, each reverter labelling the protected
  images itself (as ``preempt revert``), with McNemar p-values; ``--reversion-labels own,defender`` adds
  the old worst case (``table2_defender``: every reverter handed the defender's labels);
* ``table1aa`` Table 1's AutoAttack rows alone (none and Fast Preemption), on 8-bit images with rounding
  after every attack of the cascade, beside the float criterion and the old rounding (once at the end).

Run from the repository root (minutes to an hour on 2 CPU cores, depending on the sizes)::

    python benchmarks/bench_eval.py --out benchmarks/results
    python benchmarks/bench_eval.py --sections fig9,table7 --ablation-images 100 --out /tmp/bench-part  # a trial
    python benchmarks/bench_eval.py --sections table2 --update   # re-measure a part, keep the rest

``--update`` merges the sections run into the existing ``eval_tables.json``/``.md`` and leaves the others
as they were measured (each section says when and with which sizes); without it, a run writes its own
sections alone, which in ``benchmarks/results`` (the default ``--out``) would replace the committed tables.

Nothing here is tuned: the settings are the paper's (or the issue's) and the numbers are what they are.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

import _checkout  # benchmarks/ is on sys.path

_checkout.put_checkout_src_first()  # the checkout's code, installed or not (no PYTHONPATH=src needed)
from preempt_cli.device import default_cpu_threads, resolve_device  # noqa: E402
from preempt_cli.evaluate import AttackSpec, DefenseSpec, Evaluator, load_dataset, reversion_protocol  # noqa: E402
from preempt_cli.models import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BACKBONE = "cifar10-resnet20-pgdat-a"
CLASSIFIER = "cifar10-resnet18-std"
VICTIMS = ["cifar10-resnet20-pgdat-b", "cifar10-resnet20-pgdat-c", "cifar10-resnet56-std"]


def merge_update(results: dict[str, Any], previous: dict[str, Any], stamp: str) -> None:
    """Make ``results`` (a partial re-run's) an update of ``previous`` (the tables on disk): their sections
    kept (the re-run replaces its own as it goes), their settings and run time kept, and this run's
    settings recorded among the updates, dated ``stamp``."""
    results["sections"] = previous.get("sections", {})
    results["updates"] = previous.get("updates", []) + [{"date": stamp, "settings": results["settings"]}]
    results["settings"], results["seconds"] = previous.get("settings", {}), previous.get("seconds")


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}  # fmt: skip


def fp(name: str, **options: Any) -> DefenseSpec:
    opts = {"backbone": BACKBONE, "classifier": CLASSIFIER, "name": name, **{k: str(v) for k, v in options.items()}}
    return DefenseSpec("fast-preemption", tuple(sorted(opts.items())))


def table(rows: list[dict[str, Any]], cols: list[str]) -> list[str]:
    def fmt(v: Any) -> str:
        return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + [
        "| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows
    ]


COLS = ["victim", "defense", "attack", "n", "clean_acc", "robust_acc", "seconds_per_image", "linf", "ssim"]

#: Section order in the markdown, by the start of each section's title.
ORDER = {"table1": "End to end", "table1aa": "AutoAttack on 8-bit", "fig9": "Step ablation",
         "table7": "Optimizer ablation", "table5": "Classifier ablation", "table2": "Reversion (Table 2):",
         "table2_defender": "Reversion (Table 2), the defender's"}  # fmt: skip
#: The sizes each section was run with (said under its title).
SIZES = {"table1aa": "First {aa_images} images, victims {aa_victims}.",
         "table2": "First {reversion_images} images.", "table2_defender": "First {reversion_images} images."}  # fmt: skip


def order(key: str) -> int:
    return list(ORDER).index(key) if key in ORDER else len(ORDER)


def read_blocks(text: str) -> tuple[dict[str, list[str]], list[str]]:
    """The sections of an existing ``eval_tables.md`` by key, and its footer (run-time lines)."""
    blocks: dict[str, list[str]] = {}
    footer: list[str] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("## "):
            title = line[3:]
            key = max((k for k, start in ORDER.items() if title.startswith(start)), key=lambda k: len(ORDER[k]),
                      default=title)  # fmt: skip
            current = blocks.setdefault(key, [])
        elif line.startswith(("Run time:", "Update ")):
            footer.append(line)
            current = None
            continue
        if current is not None:
            current.append(line)
    return blocks, footer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--sections", default="table1,fig9,table7,table5,table2")
    ap.add_argument("--images", type=int, default=932, help="images for Table 1 / Table 5 PGD cells")
    ap.add_argument("--aa-images", type=int, default=100, help="images for AutoAttack cells")
    ap.add_argument("--aa-victims", default="cifar10-resnet20-pgdat-b", help="comma-separated")
    ap.add_argument("--bilevel-images", type=int, default=100,
                    help="Bi-Level took 2.4 s/image on 2 CPU cores (results/eval_tables.md)")
    ap.add_argument("--ablation-images", type=int, default=200)
    ap.add_argument("--reversion-images", type=int, default=200)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--extra-victims", default="", help="comma-separated victims added to Table 1 (e.g. the robust "
                    "victims trained by bench_keys.py: bench-resnet32-at,bench-resnet44-at)")
    ap.add_argument("--registry", type=Path, action="append", default=[],
                    help="extra registry file for --extra-victims (e.g. benchmarks/results/models/models.toml)")
    ap.add_argument("--reversion-labels", default="own", help="comma-separated: own (each reverter labels the protected "
                    "images itself, as `preempt revert`) and/or defender (the defender's labels: the old worst case)")
    ap.add_argument("--resume", action="store_true", help="reuse cached defenses and cells in --out")
    ap.add_argument("--update", action="store_true", help="merge the sections run into the existing tables")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(default_cpu_threads())  # the CLI's count: affinity, cgroup quota, Slurm
    models: dict[str, Any] = {}

    def load(name: str):
        if name not in models:
            models[name] = load_model(name, device=device, models_dir=SHARED / "models", registry=args.registry)
        return models[name]

    full = load_dataset(SHARED / "data" / "cifar10" / "test", classes=load(BACKBONE).config.classes)
    args.out.mkdir(parents=True, exist_ok=True)

    evaluators: dict[tuple[int, str], Evaluator] = {}

    def evaluator(n: int, tag: str) -> Evaluator:
        """One evaluator per image set, so defended sets are computed once and shared across sections."""
        if (n, tag) not in evaluators:
            evaluators[n, tag] = Evaluator(full.subset(n), load=load, device=device,
                                           out_dir=args.out / "cache" / f"{tag}-{n}", resume=args.resume)  # fmt: skip
        return evaluators[n, tag]

    started = time.time()
    stamp = time.strftime("%Y-%m-%d")
    results: dict[str, Any] = {"machine": machine(), "sections": {},
                               "settings": vars(args) | {"out": str(args.out), "registry": [str(r) for r in args.registry]}}
    header = ["# The paper's tables in miniature", "",
              f"Backbone `{BACKBONE}`, classifier `{CLASSIFIER}`, CIFAR-10 test images in index order. "
              "Accuracies in %; attacks crafted against each victim within eps of the image they start from, "
              "rounded to 8-bit levels (L-inf).", ""]  # fmt: skip
    blocks: dict[str, list[str]] = {}  # section key -> its markdown, in the order of ORDER
    footer: list[str] = []
    json_path, md_path = args.out / "eval_tables.json", args.out / "eval_tables.md"
    if args.update and json_path.is_file() and md_path.is_file():
        merge_update(results, json.loads(json_path.read_text()), stamp)
        blocks, footer = read_blocks(md_path.read_text())

    def write() -> None:
        body = [line for key in sorted(blocks, key=order) for line in blocks[key]]
        md_path.write_text("\n".join(header + body + footer) + "\n")
        json_path.write_text(json.dumps(results, indent=1))

    def section(key: str, title: str, rows: list[dict[str, Any]], cols: list[str] = COLS,
                extra: list[str] | None = None) -> None:  # fmt: skip
        results["sections"][key] = rows
        measured = f"Measured {stamp}." + (" " + SIZES[key].format(**vars(args)) if key in SIZES else "")
        blocks[key] = [f"## {title}", "", measured, "", *table(rows, cols), "", *(extra or [])]
        write()
        print(f"[bench_eval] {key} done after {time.time() - started:.0f} s", flush=True)

    pgd = AttackSpec.parse("pgd")
    pgd_l2 = AttackSpec.parse("pgd:norm=L2,eps=0.5")
    victims_t1 = VICTIMS + [v for v in args.extra_victims.split(",") if v]
    if "table1" in sections:
        ev = evaluator(args.images, "table1")
        rows = list(ev.grid(victims_t1, [DefenseSpec("none"), fp("Fast Preemption")], [pgd, pgd_l2]))
        aa = AttackSpec.parse(f"aa:limit={args.aa_images}")
        rows += list(ev.grid(args.aa_victims.split(","), [DefenseSpec("none"), fp("Fast Preemption")], [aa]))
        bilevel = DefenseSpec.parse("bilevel:name=Bi-Level", {"backbone": BACKBONE, "classifier": CLASSIFIER})
        aa_bilevel = AttackSpec.parse(f"aa:limit={min(args.aa_images, args.bilevel_images)}")
        if args.bilevel_images >= args.images:
            # Bi-Level on the full set: its rows sit beside the others, same images, same attacks.
            rows += list(ev.grid(victims_t1, [bilevel], [pgd, pgd_l2]))
            rows += list(ev.grid(args.aa_victims.split(","), [bilevel], [aa_bilevel]))
        else:
            # Bi-Level costs ~30x Fast Preemption: a prefix of the images, with its own none/FP baselines.
            evb = evaluator(args.bilevel_images, "table1-bilevel")
            rows += list(evb.grid(VICTIMS, [DefenseSpec("none"), bilevel, fp("Fast Preemption")], [pgd]))
            rows += list(evb.grid(args.aa_victims.split(","), [bilevel], [aa_bilevel]))
        section("table1", "End to end (Table 1)", rows)
    if "fig9" in sections:
        ev = evaluator(args.ablation_images, "ablation")
        specs = [fp("F0-B3", forward=0, backward=3), fp("F1-B2", forward=1, backward=2),
                 fp("F3-B0", forward=3, backward=0), fp("F1-B1 (mspd)", preset="mspd"),
                 fp("F0-B100", forward=0, backward=100), fp("F100-B0", forward=100, backward=0)]  # fmt: skip
        rows = list(ev.grid(VICTIMS[:2], [DefenseSpec("none"), *specs], [pgd]))
        section("fig9", "Step ablation (Fig. 9)", rows)
    if "table7" in sections:
        ev = evaluator(args.ablation_images, "ablation")
        specs = [fp("FGSM N=1", samples=1), fp("FGSM N=20", samples=20),
                 fp("PGD-10 N=1", samples=1, inner_steps=10), fp("PGD-10 N=20", samples=20, inner_steps=10)]  # fmt: skip
        rows = list(ev.grid(VICTIMS[:1], specs, [pgd]))
        section("table7", "Optimizer ablation (Table 7)", rows)
    if "table5" in sections:
        ev = evaluator(args.images, "table1")
        specs = [fp("ground truth", labels="ground-truth"), fp("Fast Preemption"),
                 fp("classifier resnet20-std", classifier="cifar10-resnet20-std")]  # fmt: skip
        rows = list(ev.grid(VICTIMS[:2], specs, [pgd]))
        section("table5", "Classifier ablation (Table 5)", rows)
    if "table1aa" in sections:
        ev = evaluator(args.aa_images, "aa")
        aa = AttackSpec.parse(f"aa:limit={args.aa_images}")
        rows = list(ev.grid(args.aa_victims.split(","), [DefenseSpec("none"), fp("Fast Preemption")], [aa]))
        section("table1aa", "AutoAttack on 8-bit images (Table 1's AutoAttack rows, re-measured)", rows,
                ["victim", "defense", "attack", "n", "clean_acc", "robust_acc", "robust_acc_float",
                 "robust_acc_rounded_once", "attack_seconds"],
                ["`robust_acc`: rounded to 8-bit levels after every attack of the cascade, the points rounding "
                 "restored attacked again by the next attack (what `preempt eval` reports after 0.4.0). "
                 "`robust_acc_float`: the reference's criterion, a point fooled once an unrounded output fools it. "
                 "`robust_acc_rounded_once`: the cascade's result rounded once at the end, as `preempt eval` 0.4.0 "
                 "and earlier reported it (biased upward). All three from the same run.", ""])  # fmt: skip
        if "table1" in blocks and "table1" not in sections and not any("AutoAttack rows above" in line
                                                                         for line in blocks["table1"]):
            blocks["table1"] += ["Note: the AutoAttack rows above were measured with the rounding of `preempt eval` "
                                 "0.4.0 and earlier (once, after the cascade, which can only bias robust accuracy upward); see "
                                 "\"AutoAttack on 8-bit images\" below for the re-measurement.", ""]  # fmt: skip
            write()
    for mode in [m for m in args.reversion_labels.split(",") if m] if "table2" in sections else []:
        ev = evaluator(args.reversion_images, "reversion")
        res = reversion_protocol(ev, victims=VICTIMS, defense=fp("Fast Preemption"),
                                 black_box_backbone="cifar10-resnet20-pgdat-c", flip_fraction=1.0,
                                 reverter_labels=mode)  # fmt: skip
        rows = []
        for victim, r in res["victims"].items():
            rows.append({"victim": victim, **r["clean_acc"],
                         **{f"p {k}": v for k, v in r["p_value"].items()},
                         **{f"verdict {k}": v for k, v in r["verdict"].items()}})  # fmt: skip
        stages = list(next(iter(res["victims"].values()))["clean_acc"])
        who = "; ".join(f"{k}: {v}" for k, v in res["reverter_labels"].items())
        key = "table2" if mode == "own" else f"table2_{mode}"
        title = "Reversion (Table 2)" + ("" if mode == "own" else ", the defender's labels handed to the reverters")
        section(key, f"{title}: {res['labels']}, {args.reversion_images} images", rows, ["victim", *stages],
                [f"Reverters label with: {who}. {res['test']}.", "",
                 *table([{"victim": r["victim"], **{s: f"{r[f'p {s}']:.2g}" for s in stages if f"p {s}" in r}}
                         for r in rows], ["victim", *[s for s in stages if s != "original"]]),
                 "", "(p-values: protected against original; each reversion against protected.) Verdicts:", "",
                 *[f"- {r['victim']}: " + "; ".join(f"{s}: {r[f'verdict {s}']}" for s in stages
                                                     if f"verdict {s}" in r) for r in rows], ""])  # fmt: skip
        results["sections"][f"{key}_raw"] = res
        write()
    seconds = round(time.time() - started, 1)
    line = (f"{seconds:.0f} s on {results['machine']['cpu']} ({results['machine']['cores']} cores), "
            f"torch {results['machine']['torch']}")  # fmt: skip
    if args.update and results.get("updates"):
        results["updates"][-1]["seconds"] = seconds
        footer.append(f"Update {stamp} (sections {args.sections}): {line}.")
    else:
        results["seconds"] = seconds
        footer[:] = [f"Run time: {line}."]
    write()
    print(md_path.read_text())
    print(json.dumps({"benchmark": "bench_eval", "seconds": seconds, "machine": results["machine"]}))


if __name__ == "__main__":
    main()
