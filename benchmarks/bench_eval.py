"""The paper's evaluation tables in miniature, on the shared CIFAR-10 models and the 932 test images.

Sections (each a markdown table in the output, all numbers also in one JSON file and a final JSON line):

* ``table1``  end to end (paper Table 1): defenses none / Bi-Level / Fast Preemption x victims, PGD-20
  L-inf 8/255 and L2 0.5, AutoAttack standard on the first ``--aa-images``;
* ``fig9``    step ablation: F0-B3, F1-B2, F3-B0, F1-B1 (mspd preset), F0-B100;
* ``table7``  optimizer ablation: averaged FGSM vs averaged PGD samples, N = 1 vs N = 20;
* ``table5``  classifier ablation: ground truth vs cifar10-resnet18-std vs cifar10-resnet20-std;
* ``table2``  reversion protocol: white-box, black-box, JPEG-50.

Run from the repository root (minutes to an hour on 2 CPU cores, depending on the sizes)::

    python benchmarks/bench_eval.py --out benchmarks/results
    python benchmarks/bench_eval.py --sections fig9,table7 --ablation-images 100   # a part

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

from preempt_cli.device import resolve_device
from preempt_cli.evaluate import AttackSpec, DefenseSpec, Evaluator, load_dataset, reversion_protocol
from preempt_cli.models import load_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BACKBONE = "cifar10-resnet20-pgdat-a"
CLASSIFIER = "cifar10-resnet18-std"
VICTIMS = ["cifar10-resnet20-pgdat-b", "cifar10-resnet20-pgdat-c", "cifar10-resnet56-std"]


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--sections", default="table1,fig9,table7,table5,table2")
    ap.add_argument("--images", type=int, default=932, help="images for Table 1 / Table 5 PGD cells")
    ap.add_argument("--aa-images", type=int, default=100, help="images for AutoAttack cells")
    ap.add_argument("--aa-victims", default="cifar10-resnet20-pgdat-b", help="comma-separated")
    ap.add_argument("--bilevel-images", type=int, default=100, help="Bi-Level costs ~5 s/image on 2 CPU cores")
    ap.add_argument("--ablation-images", type=int, default=200)
    ap.add_argument("--reversion-images", type=int, default=200)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--extra-victims", default="", help="comma-separated victims added to Table 1 (e.g. the robust "
                    "victims trained by bench_keys.py: bench-resnet32-at,bench-resnet44-at)")
    ap.add_argument("--registry", type=Path, action="append", default=[],
                    help="extra registry file for --extra-victims (e.g. benchmarks/results/models/models.toml)")
    ap.add_argument("--resume", action="store_true", help="reuse cached defenses and cells in --out")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))
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
    results: dict[str, Any] = {"machine": machine(), "sections": {},
                               "settings": vars(args) | {"out": str(args.out), "registry": [str(r) for r in args.registry]}}
    md = ["# The paper's tables in miniature", "",
          f"Backbone `{BACKBONE}`, classifier `{CLASSIFIER}`, CIFAR-10 test images in index order. "
          "Accuracies in %; attacks crafted against each victim within eps of the image they start from, "
          "rounded to 8-bit levels (L-inf).", ""]  # fmt: skip

    def section(key: str, title: str, rows: list[dict[str, Any]], cols: list[str] = COLS) -> None:
        results["sections"][key] = rows
        md.extend([f"## {title}", "", *table(rows, cols), ""])
        (args.out / "eval_tables.json").write_text(json.dumps(results, indent=1))
        (args.out / "eval_tables.md").write_text("\n".join(md) + "\n")
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
                 fp("F0-B100", forward=0, backward=100)]  # fmt: skip
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
    if "table2" in sections:
        ev = evaluator(args.reversion_images, "reversion")
        res = reversion_protocol(ev, victims=VICTIMS, defense=fp("Fast Preemption"),
                                 black_box_backbone="cifar10-resnet20-pgdat-c", flip_fraction=1.0)  # fmt: skip
        rows = []
        for victim, r in res["victims"].items():
            rows.append({"victim": victim, **r["clean_acc"],
                         **{f"verdict {k}": v for k, v in r["verdict"].items()}})  # fmt: skip
        stages = list(next(iter(res["victims"].values()))["clean_acc"])
        section("table2", f"Reversion (Table 2): {res['labels']}, {args.reversion_images} images", rows,
                ["victim", *stages])  # fmt: skip
        results["sections"]["table2_raw"] = res
    results["seconds"] = round(time.time() - started, 1)
    md.append(f"Run time: {results['seconds']:.0f} s on {results['machine']['cpu']} "
              f"({results['machine']['cores']} cores), torch {results['machine']['torch']}.")  # fmt: skip
    (args.out / "eval_tables.md").write_text("\n".join(md) + "\n")
    (args.out / "eval_tables.json").write_text(json.dumps(results, indent=1))
    print("\n".join(md))
    print(json.dumps({"benchmark": "bench_eval", "seconds": results["seconds"], "machine": results["machine"]}))


if __name__ == "__main__":
    main()
