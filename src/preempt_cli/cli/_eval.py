"""``preempt eval``: what protection buys, measured with the paper's protocol."""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, Sequence

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..evaluate import (
    PAIRED_BETWEEN_TEST,
    PAIRED_TEST,
    AttackSpec,
    DefenseSpec,
    Evaluator,
    check_reversion_options,
    format_p,
    json_dumps,
    load_dataset,
    perturbation_map_name,
    reversion_protocol,
)
from ..engine import check_seed
from ..errors import ConfigError, PreemptError
from .._paths import expand_home, make_folders
from ..imageio import atomic_write
from . import _common as c
from ._files import _defaults, _model_cache, _setup_torch, backbone_option, classifier_option

_logger = logging.getLogger(__name__)

# eval's own help: its -b/-c are the models of its defenses, with protect's defaults
EvalBackboneOpt = backbone_option("Backbone of the fp and bilevel defenses that name none (see 'preempt models "
                                  "list'; default: the built-in preempt-resnet20-at).")
EvalClassifierOpt = classifier_option("Classifier of the fp and bilevel defenses that name none (default: the "
                                      "built-in preempt-resnet20-std when the backbone is a CIFAR-10 model).")
# protect's "same seed + device = same output" is not eval's: its attacks take the seed of their own spec
EvalSeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the fp and bilevel defenses whose spec sets no "
                                          "seed= (and of --flip-fraction's flips); an attack's is its spec's seed= "
                                          "(default 0).")]

EVAL_EPILOG = """\
[bold]Examples[/]

  preempt eval ../shared/data/cifar10/test --limit 200 --models-dir ../shared/models \\
      -b cifar10-resnet20-pgdat-a -c cifar10-resnet18-std \\
      --victim cifar10-resnet20-pgdat-b --defense none --defense fp --attack pgd --attack aa:limit=50

  preempt eval DATA --victim V --defense fp:preset=mspd --defense bilevel:steps=100 --attack pgd:norm=L2,eps=0.5

  preempt eval DATA --reversion --victim V -b KEY -c weak-classifier --reversion-backbone OTHER

Defenses: none | fp[:backbone=,classifier=,labels=classifier|ground-truth|backbone,preset=,eps=,eta=,forward=,
backward=,samples=,inner_steps=,seed=,precision=,compile=,name=] | bilevel[:steps=100,eta=0.1,inner_steps=20,optimizer=sign|rmsprop,...]
| folder:PATH.  Attacks: pgd[:norm=Linf|L2,eps=,steps=20,step_size=,restarts=,limit=,seed=] |
aa[:version=standard|rand,norm=,eps=,limit=,seed=].
"""


#: What the table's columns other than the accuracies hold, and in which units (the table's caption, and
#: the report's).
UNITS = ("Seconds per image: the defense's time per image (labelling included, model loading not); linf: its "
         "largest change of a pixel, in [0, 1] units (8/255 = 0.03137); ssim (and lpips): between original and "
         "defended images, the mean over the images.")


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


#: The z of a two-sided 95% interval.
_Z95 = 1.959964


def _widest_interval(n: int) -> float:
    """The farthest, in points, that an accuracy measured on ``n`` images lies from either end of its Wilson
    95% interval, over the n + 1 accuracies n images give. Not the half-width at 50%: off 50% the interval's
    centre moves toward 50%, so one end lies farther (8 of 8 right: [67.6, 100], 32.4 points below, where
    the half-width at 50% is 28.5)."""
    z2 = _Z95**2
    farthest = 0.0
    for right in range(n + 1):
        p = right / n
        center = (p + z2 / (2 * n)) / (1 + z2 / n)
        half = _Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
        farthest = max(farthest, center + half - p, p - (center - half))
    return 100 * farthest


def _precision_note(rows: list[dict[str, Any]], paired: bool = False, between: bool = False) -> str:
    """How far the report's accuracies can be trusted: the rows are not tested against each other (a few
    images, `--limit 8`, read as a gain of 12.5 points), so the report says the interval of its smallest n;
    ``paired``: those against no defense are, in the report's next section; ``between``: and the defenses
    against each other, in the one after it."""
    n = min((r["n"] for r in rows if isinstance(r.get("n"), int) and r["n"] > 0), default=0)
    if not n:
        return ""
    tested = [what for what, shown in (("each defense against none", paired),
                                       ("the defenses against each other", between)) if shown]  # fmt: skip
    tested = f" (except {' and '.join(tested)}: paired on the same images below)" if tested else ""
    return (f"Each accuracy is a fraction of n images: on {n} image{'s' if n > 1 else ''} its 95% confidence "
            f"interval (Wilson) reaches up to ±{_widest_interval(n):.1f} points from it. The rows are not tested "
            f"against each other{tested}; a difference between two rows within that reach may be noise.")


def _paired_lines(paired: list[dict[str, Any]], defenses: list[DefenseSpec]) -> list[str]:
    """The report's section "Paired with no defense": one row per victim, defense and metric of
    :meth:`Evaluator.paired_with_none`, and why any was not tested."""
    lines = ["## Paired with no defense", ""]
    if not paired:
        why = ("the run has no `none` defense to pair with" if not any(d.kind == "none" for d in defenses)
               else "the run has no defense besides `none`")  # fmt: skip
        return [*lines, f"No paired test: {why}.", ""]
    lines += ["What each defense buys, tested on the same images (also in `paired.json`). Metric: clean accuracy, "
              "or robust accuracy under the attack named. gain: defense minus none, in points; gained: images "
              "right only with the defense; lost: images right only without it; p: "
              f"{PAIRED_TEST[0].lower()}{PAIRED_TEST[1:]}; p (Holm): p adjusted by Holm's method for the "
              "number of tests in the table (below 0.05: a gain or loss that stands with all of them read at once).",
              ""]  # fmt: skip
    cols = ["victim", "defense", "metric", "n", "none (%)", "defense (%)", "gain", "gained", "lost", "p", "p (Holm)"]
    return lines + _records_table(cols, paired, lambda r: [r["victim"], r["defense"], _metric_text(r), str(r["n"]),
                                                           _fmt(r["none_acc"]), _fmt(r["defense_acc"])])


def _records_table(cols: list[str], records: list[dict[str, Any]],
                   leading: Callable[[dict[str, Any]], list[str]]) -> list[str]:  # fmt: skip
    """A table of paired records: per record its ``leading`` cells then its test's (:func:`_test_cells`), and
    under the table why any was not tested."""
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    reasons: list[str] = []
    lines += ["| " + " | ".join([*leading(r), *_test_cells(r, reasons)]) + " |" for r in records]
    if reasons:
        lines += ["", *(f"n/a: {reason}" for reason in dict.fromkeys(reasons))]
    return [*lines, ""]


def _metric_text(record: dict[str, Any]) -> str:
    """A paired record's metric as the report's tables name it."""
    return "clean" if record["metric"] == "clean_acc" else f"robust, {record['attack']}"


def _test_cells(record: dict[str, Any], reasons: list[str]) -> list[str]:
    """A paired record's difference, gained, lost, p and p (Holm) as the report's tables give them; n/a where
    it was not tested, its reason added to ``reasons``."""
    if record["not_tested"] is not None:
        reasons.append(record["not_tested"])
        return ["n/a", "-", "-", "n/a", "n/a"]
    return [f"{record['gain_points']:+.2f}", str(record["gained"]), str(record["lost"]), format_p(record["p_value"]),
            format_p(record["p_holm"])]  # fmt: skip


def _between_lines(between: list[dict[str, Any]]) -> list[str]:
    """The report's section "Defenses against each other": one row per victim, pair of defenses and metric of
    :meth:`Evaluator.paired_between_defenses`, and why any was not tested."""
    lines = ["## Defenses against each other", ""]
    if not between:
        return [*lines, "No paired test: no two defenses were measured with the same victim and attack.", ""]
    lines += ["The defenses other than none against each other, tested on the same images (also in `paired.json`, "
              "under `between_defenses`). First and second: the pair's defenses in the order `--defense` gave them. "
              "difference: second minus first, in points; gained: images right only with the second; lost: images "
              f"right only with the first; p: {PAIRED_BETWEEN_TEST[0].lower()}{PAIRED_BETWEEN_TEST[1:]}; p (Holm): "
              "p adjusted by Holm's method for the number of tests in this table, a family of its own apart from "
              "the table against none (below 0.05: a difference that stands with all of them read at once).",
              ""]  # fmt: skip
    cols = ["victim", "first", "second", "metric", "n", "first (%)", "second (%)", "difference", "gained", "lost",
            "p", "p (Holm)"]  # fmt: skip
    return lines + _records_table(cols, between, lambda r: [r["victim"], r["first"], r["second"], _metric_text(r),
                                                            str(r["n"]), _fmt(r["first_acc"]), _fmt(r["second_acc"])])


def _paired_summary(paired: list[dict[str, Any]], alpha: float = 0.05) -> str | None:
    """One line under the table: how many of the paired tests against none find a gain, or a loss, that
    stands with all of them read at once (Holm-adjusted p below ``alpha``); the pairs are in the report."""
    tested, tests = _tests_counted(paired)
    if not tested:
        return None
    gains = sum(r["p_holm"] < alpha and r["gained"] > r["lost"] for r in tested)
    losses = sum(r["p_holm"] < alpha and r["gained"] < r["lost"] for r in tested)
    return (f"Paired with no defense: {tests}; {gains} gains and {losses} losses stand "
            f"(Holm-adjusted p < {alpha:g}; see the report)")


def _between_summary(between: list[dict[str, Any]], alpha: float = 0.05) -> str | None:
    """The sibling of :func:`_paired_summary` for the defenses against each other: how many of their tests
    find a difference that stands with all of them read at once (Holm-adjusted p below ``alpha``)."""
    tested, tests = _tests_counted(between)
    if not tested:
        return None
    stand = sum(r["p_holm"] < alpha and r["gained"] != r["lost"] for r in tested)
    return (f"Defenses against each other: {tests}; {stand} difference{'s' if stand != 1 else ''} "
            f"{'stand' if stand != 1 else 'stands'} (Holm-adjusted p < {alpha:g}; see the report)")


def _tests_counted(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """The paired records tested (Holm-adjusted p given), and "N tests[, M not tested]" of ``records``."""
    tested = [r for r in records if r["p_holm"] is not None]
    untested = f", {len(records) - len(tested)} not tested" if len(tested) < len(records) else ""
    return tested, f"{len(tested)} test" + ("s" if len(tested) != 1 else "") + untested


def _resumed_text(run: dict[str, Any]) -> str:
    """What a resumed run took from earlier runs, and what computed it (empty when it computed all)."""
    resumed = run["resumed"]
    if not any(resumed.values()):
        return ""
    by = "; ".join(f"preempt {o['preempt']} (torch {o['torch']}) on {o['device']}" for o in run["computed_by"])
    return (f"{resumed['cells']} cells and {resumed['defenses']} defended sets were resumed from `--out`; the "
            f"results were computed by: {by}. ")


def _write_report(out: Path, rows: list[dict[str, Any]], evaluator: Evaluator, defenses: list[DefenseSpec],
                  title: str, run: dict[str, Any], paired: list[dict[str, Any]],
                  between: list[dict[str, Any]] | None = None) -> Path:  # fmt: skip
    """report.md in ``out``; ``between`` (None: no section): the defenses against each other."""
    from ..quality import save_perturbation_figure

    lines = [f"# {title}", "", f"Data: `{evaluator.dataset.root}` ({len(evaluator.dataset)} images). "
             "Accuracies in %; robust accuracy on 8-bit adversarial examples crafted against each victim within "
             f"eps of the image they start from. {UNITS}", "",
             f"Run by preempt {run['preempt']} (torch {run['torch']}) on {run['device']}, finished "
             f"{run['finished']}; data fingerprint {run['data_fingerprint']}. {_resumed_text(run)}The weights' "
             "sha256, the image files, the batch sizes and every defense's and attack's settings (seeds "
             "included) are in `run.json`.", ""]  # fmt: skip
    cols = ["victim", "defense", "attack", "n", "clean_acc", "robust_acc", "seconds_per_image", "linf", "ssim", "lpips"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in cols) + " |" for r in rows]
    notes = sorted({r["lpips_note"] for r in rows if r.get("lpips_note")})
    if notes:
        lines += ["", *notes]
    precision = _precision_note(rows, paired=bool(paired), between=bool(between))
    if precision:
        lines += ["", precision]
    lines += ["", *_paired_lines(paired, defenses)]
    if between is not None:
        lines += _between_lines(between)
    lines += ["## Perturbation maps", "", "Rows: original, defended, perturbation map (Eq. 14: delta mapped "
              "from [-eps, eps] to [0, 1], NTSC gray).", ""]  # fmt: skip
    for spec in defenses:
        if spec.kind == "none":
            continue
        # its first images only: a set whose cells were all resumed has its SSIM and LPIPS in their rows already
        originals, defended, eps = evaluator.map_images(spec)
        name = perturbation_map_name(spec)
        save_perturbation_figure(out / name, originals.float() / 255, defended.float() / 255, eps)
        lines += [f"### {spec.name}", "", f"![{spec.name}]({name})", ""]
    path = out / "report.md"
    _write_text(path, "\n".join(lines) + "\n")
    return path


def _write_text(path: Path, text: str) -> None:
    """Write a result file whole or not at all, a failure one line naming it (exit 1)."""
    with atomic_write(path) as f:
        f.write(text.encode("utf-8"))


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO(newline="")
    fields = list(dict.fromkeys(k for r in rows for k in r))  # AutoAttack rows have more columns
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _defense(text: str, defaults: dict[str, str]) -> DefenseSpec:
    """``--defense TEXT`` parsed, its values read; a value that does not parse is a usage error naming the
    option.

    Raises:
        ConfigError: unknown defense, option or value, or a folder defense whose folder does not exist.
    """
    try:
        spec = DefenseSpec.parse(text, defaults)
    except PreemptError as e:
        raise ConfigError(f"--defense {text}: {e}") from e
    if spec.kind == "folder" and not os.path.isdir(spec.get("path")):
        raise ConfigError(f"--defense {text}: {spec.get('path')} is not a folder")
    return spec


def _attack(text: str) -> AttackSpec:
    """``--attack TEXT`` parsed; a value that does not parse is a usage error naming the option.

    Raises:
        ConfigError: unknown attack, option or value.
    """
    try:
        return AttackSpec.parse(text)
    except PreemptError as e:
        raise ConfigError(f"--attack {text}: {e}") from e
    except (TypeError, ValueError) as e:  # a value of the wrong type (steps=abc)
        raise ConfigError(f"--attack {text}: invalid value ({e})") from e


def _check_distinct(option: str, given: Sequence[str], identities: Sequence[Any]) -> None:
    """Refuse a repeatable option given twice for one thing (``--defense fp --defense fp:seed=0``, one fp
    defense with the default seed): each of its cells was computed again, into a row like the first.
    ``identities``: what each value of ``given`` is (a defense's key, an attack's settings, a victim's name).

    Raises:
        ConfigError: naming both values.
    """
    first: dict[Any, str] = {}
    for text, identity in zip(given, identities):
        if identity in first:
            same = (f"{option} {text} is given twice" if text == first[identity]
                    else f"{option} {first[identity]} and {option} {text} are the same")  # fmt: skip
            raise ConfigError(f"{same}: give it once (its cells would be computed twice, into two rows alike)")
        first[identity] = text


#: Options of the reversion protocol only (parameter: option).
REVERSION_ONLY = {"reversion_backbone": "--reversion-backbone", "reversion_classifier": "--reversion-classifier",
                  "reversion_labels": "--reversion-labels", "flip_fraction": "--flip-fraction",
                  "jpeg_quality": "--jpeg-quality"}  # fmt: skip
#: Options of the evaluation grid that the reversion protocol does not use (parameter: option).
GRID_ONLY = {"attack": "--attack", "csv_path": "--csv", "resume": "--resume"}


def _check_ignored(ctx: typer.Context, reversion: bool) -> None:
    """Refuse options given on the command line that this run would ignore: the reversion protocol's without
    ``--reversion``; ``--attack``, ``--csv`` and ``--resume`` with it (it measures clean accuracy only, writes
    ``reversion.json`` and computes everything afresh).

    Raises:
        ConfigError: such an option was given.
    """
    given = c.given_on_command_line(ctx, GRID_ONLY if reversion else REVERSION_ONLY)
    if not given:
        return
    them = "it" if len(given) == 1 else "them"
    if reversion:
        raise ConfigError(f"--reversion does not use {', '.join(given)} (it measures clean accuracy only, writes "
                          f"reversion.json and computes everything afresh); drop {them}")  # fmt: skip
    verb = "applies" if len(given) == 1 else "apply"
    raise ConfigError(f"{', '.join(given)} only {verb} with --reversion; drop {them} (or add --reversion)")


def _command_options(ctx: typer.Context) -> dict[str, Any]:
    """The command's arguments and options as this run read them (defaults included), for ``run.json``:
    what runs it again."""
    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, os.PathLike) else value

    return {name: plain(value) for name, value in ctx.params.items()}


def _resolved_paths(**paths: Path | None) -> dict[str, str | None]:
    """The paths of ``run.json``'s ``command_options`` (DATA, ``--out``...) as this run read and wrote them:
    ``~`` expanded and absolute. The options keep what was typed, which a ``~`` or a relative path leaves
    unknown once the run's shell and folder are gone."""
    return {name: None if path is None else os.path.abspath(path) for name, path in paths.items()}


def _check_outputs(data: Path, out: Path, csv_path: Path | None) -> None:
    """Problems found before any model loads: a missing DATA folder, an output folder or CSV file that
    cannot be written (the CSV's folder is created).

    Raises:
        ConfigError: one of them.
    """
    if not os.path.exists(data):
        raise ConfigError(f"{data}: no such folder")
    c.check_out_dir(out, "--out")
    if csv_path is not None:
        if os.path.isdir(csv_path):
            raise ConfigError(f"--csv {csv_path}: is a folder; name the CSV file to write")
        try:
            make_folders(csv_path.parent)
        except NotADirectoryError as e:  # says which folder, and what is in its way
            raise ConfigError(f"--csv {csv_path}: {e.strerror}") from e
        except OSError as e:
            raise ConfigError(f"--csv {csv_path}: cannot create its folder ({e.strerror})") from e
        if not os.access(csv_path.parent, os.W_OK | os.X_OK):
            raise ConfigError(f"--csv {csv_path}: its folder cannot be written")


def eval_cmd(
    ctx: typer.Context,
    data: Annotated[Path, typer.Argument(metavar="DATA", help="ImageFolder directory, or a folder of files with "
                                         "--labels-file.")],
    victim: Annotated[list[str], typer.Option("--victim", metavar="NAME", help="Victim model (repeatable).")],
    defense: Annotated[
        Optional[list[str]], typer.Option("--defense", metavar="SPEC", help="Defense spec (repeatable; default: none and fp, with --reversion fp).")
    ] = None,
    attack: Annotated[
        Optional[list[str]], typer.Option("--attack", metavar="SPEC", help="Attack spec (repeatable; default: pgd).")
    ] = None,
    backbone: EvalBackboneOpt = None,
    classifier: EvalClassifierOpt = None,
    labels_file: Annotated[Optional[Path], typer.Option("--labels-file", metavar="FILE", help="CSV/JSON of file,label.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="First N images, sorted by file name.")] = None,
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Folder for the report, results and the resume state.")] = Path(
        "preempt-eval"
    ),
    resume: Annotated[bool, typer.Option("--resume", help="Reuse finished defenses and cells in --out.")] = False,
    csv_path: Annotated[Optional[Path], typer.Option("--csv", metavar="FILE", help="Also write the rows as CSV.")] = None,
    reversion: Annotated[bool, typer.Option("--reversion", help="Run the reversion protocol instead.")] = False,
    reversion_backbone: Annotated[
        Optional[list[str]], typer.Option("--reversion-backbone", metavar="NAME", help="Black-box attacker's backbone (repeatable: one stage each).")
    ] = None,
    reversion_classifier: Annotated[
        Optional[str], typer.Option("--reversion-classifier", metavar="NAME", help="Black-box attacker's own classifier (default: "
                                    "the white-box attacker's labeller, with its own backbone).")
    ] = None,
    reversion_labels: Annotated[
        str, typer.Option("--reversion-labels", help="Who labels the protected images for a reversion: own (each "
                          "reverter its own labeller, as 'preempt revert') or defender (the defender's labels: an "
                          "oracle, the worst case for the defender).")
    ] = "own",
    flip_fraction: Annotated[
        float, typer.Option("--flip-fraction", help="Reversion: flip this fraction (0 to 1) of ground-truth labels.")
    ] = 0.0,
    jpeg_quality: Annotated[
        int, typer.Option("--jpeg-quality", help="Reversion: quality (1-100, Pillow's scale) of the blind JPEG "
                          "reversion, the stage JPEG-<quality>.")
    ] = 50,
    seed: EvalSeedOpt = 0,
    device: c.DeviceOpt = "auto",
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Images per defense batch (default: 256 "
                                                      "on a CUDA GPU, else 50).")] = None,
    models_dir: c.ModelsDirOpt = None,
    registry: c.RegistryOpt = None,
    json_out: c.JsonOpt = False,
    quiet: c.QuietOpt = False,
    verbose: c.VerboseOpt = 0,
    log: c.LogOpt = None,
) -> None:
    """Measure victim clean and robust accuracy before/after protection, reversion, quality and time."""
    c.setup_logging(verbose, quiet)
    # a quoted '~/x' as the shell would have expanded it: the folder checked must be the folder written
    home_out = expand_home(out, existing_literal=False)
    if resume and home_out != out and os.path.isdir(out):
        # preempt < 0.17 wrote a quoted '~/x' into ./~/x: a resume from ~/x would not see it
        _logger.warning("--out %s: %s also exists (preempt before 0.17.0 wrote a quoted ~ there): it is not "
                        "resumed; move it to %s to resume it", out, os.path.abspath(out), home_out)  # fmt: skip
    data, out = expand_home(data), home_out
    labels_file = expand_home(labels_file) if labels_file is not None else None
    csv_path = expand_home(csv_path, existing_literal=False) if csv_path is not None else None
    paths = _resolved_paths(data=data, out=out, labels_file=labels_file, csv_path=csv_path)
    # what a re-run does: only --resume reuses the grid's finished cells (a plain run computes all again);
    # the reversion protocol keeps nothing
    hint = ("nothing is kept; run again" if reversion
            else "finished cells are kept in --out; run again with --resume to do the rest")  # fmt: skip
    with c.handle_errors(interrupted=hint):
        backbone, classifier = _defaults(backbone, classifier, "classifier", registry, required=False)  # the built-in models
        try:
            check_seed(seed)
        except ConfigError as e:
            raise ConfigError(f"--seed: {e}") from e
        defaults = {"backbone": backbone, "classifier": classifier, "seed": str(seed)}
        defenses = [_defense(d, defaults) for d in (defense or (["fp"] if reversion else ["none", "fp"]))]
        attacks = [_attack(a) for a in (attack or ["pgd"])]
        if batch_size is not None and batch_size < 1:
            raise ConfigError("--batch-size must be >= 1")
        if limit is not None and limit < 1:
            raise ConfigError("--limit must be >= 1")
        if reversion and (len(defenses) != 1 or defenses[0].kind != "fast-preemption"):
            raise ConfigError("--reversion takes exactly one fp defense")
        _check_ignored(ctx, reversion)
        _check_distinct("--victim", victim, victim)
        _check_distinct("--defense", defense or [], [d.key for d in defenses])
        # an attack by every setting it runs with (pgd is pgd:steps=20), and whether it takes the victim's budget
        _check_distinct("--attack", attack or [],
                        [(tuple(a.settings().items()), a.get("eps") is None) for a in attacks])  # fmt: skip
        if reversion:
            check_reversion_options(flip_fraction, jpeg_quality, reversion_labels, defenses[0])
            # a classifier given for the defense, on the command line or in its spec (not the default one)
            named = c.given_on_command_line(ctx, {"classifier": "-c/--classifier"}) + [
                f"--defense {d}" for d in (defense or []) if DefenseSpec.parse(d, {"backbone": backbone}).get("classifier")]
            if flip_fraction > 0 and named:
                raise ConfigError(f"--flip-fraction labels the defense with flipped ground truth: it does not use "
                                  f"a classifier ({', '.join(named)}); drop it (--reversion-classifier sets the "
                                  f"black-box reverter's)")  # fmt: skip
        _check_outputs(data, out, csv_path)
        torch_device = _setup_torch(device)
        load = _model_cache(torch_device, models_dir, registry)

        first = load(victim[0])
        dataset = load_dataset(data, classes=first.config.class_names, labels_file=labels_file, limit=limit,
                               synsets=first.config.class_synsets)  # fmt: skip
        evaluator = Evaluator(dataset, load=load, device=torch_device, out_dir=out, resume=resume,
                              batch_size=batch_size)  # fmt: skip
        if not reversion:  # every defense is scored with SSIM: images it cannot score fail now, not after one ran
            evaluator.check_ssim_size()
        # every model the run uses, before any work: a victim of other classes than the data's is refused
        # now, not after the defenses ran (a reversion with flipped labels uses no classifier: not loaded)
        for name in victim:
            evaluator.load_victim(name)
        used = [(role, n) for d in defenses for role, n in Evaluator.defense_models(d)
                if not (reversion and flip_fraction > 0 and role == "classifier")]  # fmt: skip
        reverters = [*(reversion_backbone or []), *([reversion_classifier] if reversion_classifier else [])]
        for name in dict.fromkeys([*(n for _, n in used), *(reverters if reversion else [])]):
            evaluator.load(name)
        try:
            make_folders(out)
        except OSError as e:  # checked before the models loaded, but the folder may have changed since
            raise ConfigError(f"--out {out}: {e.strerror or e}") from e
        # what the results were computed with, kept beside them (written with them, at the end)
        involved = [*victim, *(n for _, n in used), *(reverters if reversion else [])]
        if reversion:
            result = reversion_protocol(evaluator, victims=victim, defense=defenses[0],
                                        black_box_backbone=reversion_backbone, jpeg_quality=jpeg_quality,
                                        flip_fraction=flip_fraction, seed=seed,
                                        black_box_classifier=reversion_classifier,
                                        reverter_labels=reversion_labels)  # fmt: skip
            # shown first: a file that cannot be written must not lose what was computed (nothing resumes it)
            if json_out:
                c.print_json(result, allow_nan=False)  # strict: a value not measured is null
            else:
                for name, res in result["victims"].items():
                    table = Table(title=c.table_cell(f"{name}: clean accuracy (%) — {result['labels']}"),
                                  header_style="bold", caption=result["test"])  # fmt: skip
                    table.add_column("stage")
                    table.add_column("clean acc", justify="right")
                    table.add_column("p", justify="right")
                    table.add_column("verdict")
                    table.add_column("reverter labels")
                    for stage, acc in res["clean_acc"].items():
                        p_value = res["p_value"].get(stage)
                        cells = (stage, f"{acc:.2f}", "" if p_value is None else format_p(p_value),
                                 res["verdict"].get(stage, ""), result["reverter_labels"].get(stage, ""))  # fmt: skip
                        table.add_row(*map(c.table_cell, cells))
                    c.print_table(table)
            run = {**evaluator.provenance(involved), "command_options": _command_options(ctx),
                   "resolved_paths": paths}
            _write_text(out / "reversion.json", json_dumps({**result, "run": run}, indent=1))
            raise typer.Exit(c.EXIT_OK)

        total = len(defenses) * len(victim) * len(attacks)
        rows: list[dict[str, Any]] = []
        progress = c.progress_bar(TextColumn("[bold]Evaluating"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), quiet=quiet)  # fmt: skip
        with progress:
            task = progress.add_task("cells", total=total)
            for row in evaluator.grid(victim, defenses, attacks):
                rows.append(row)
                if json_out:
                    c.print_json(row, allow_nan=False)
                progress.advance(task)
        if not json_out:
            table = Table(header_style="bold", show_edge=False, caption=UNITS)
            cols = ["victim", "defense", "attack", "n", "clean_acc", "robust_acc", "seconds_per_image", "linf", "ssim"]
            for col in cols:  # names (victim, defense, attack) whole, on one line: numbers give way first
                name = col in cols[:3]
                header = col.replace("_", " ") + (" (%)" if col.endswith("_acc") else "")
                table.add_column(header, justify="left" if name else "right", no_wrap=name,
                                 overflow="fold" if name else "ellipsis")  # fmt: skip
            for r in rows:
                table.add_row(*(c.table_cell(_fmt(r.get(k))) for k in cols))
            c.print_table(table)
        # after the table: a file that cannot be written fails the run (exit 1) with the results shown
        run = {**evaluator.provenance(involved), "command_options": _command_options(ctx),
               "resolved_paths": paths}
        paired = evaluator.paired_with_none()
        # the defenses against each other: only where two were evaluated besides none (paired.json keeps its keys)
        between = (evaluator.paired_between_defenses()
                   if len({d.key for d in defenses if d.kind != "none"}) >= 2 else None)  # fmt: skip
        tests = {"test": PAIRED_TEST, "pairs": paired}
        if between is not None:
            tests |= {"between_test": PAIRED_BETWEEN_TEST, "between_defenses": between}
        _write_text(out / "results.json", json_dumps(rows, indent=1))
        _write_text(out / "paired.json", json_dumps(tests, indent=1))
        _write_text(out / "run.json", json_dumps(run, indent=1))
        if csv_path is not None:
            _write_text(csv_path, _csv_text(rows))
        report = _write_report(out, rows, evaluator, defenses, "preempt eval", run, paired, between)
        if (summary := _paired_summary(paired)) is not None:
            c.note(summary, shown=not quiet)
        if between is not None and (summary := _between_summary(between)) is not None:
            c.note(summary, shown=not quiet)
        c.note(f"Report: {report}", shown=not quiet)
    raise typer.Exit(c.EXIT_OK)
