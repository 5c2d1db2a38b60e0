"""``preempt protect`` and ``preempt revert``: parse, validate, one library call per group, print."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Iterator, Optional

import torch
import typer
from rich.progress import (BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from ..device import configure_cpu, resolve_devices
from ..engine import PRECISIONS, PRESETS, ForeBackConfig, check_seed, parse_eps
from ..errors import ConfigError, PreemptError, UnknownModelError, excerpt
from .._paths import expand_home
from ..imageio import DEFAULT_MAX_PIXELS, is_fifo, lift_pillow_pixel_limit, read_images, read_png_text
from ..inputs import (OUTPUT_MARKERS, PROTECTED_SUFFIX, REVERTED_SUFFIX, InputFile, assign_outputs, collect_inputs,
                      in_shard, parse_shard, path_list_text, paths_listed, read_failure, without_suffixed_outputs)  # fmt: skip
from ..labels import LabelMap, read_label_file
from ..models import ImageModel, load_model, state_sha256
from ..protect import (
    METADATA_KEY,
    FileResult,
    Protector,
    RunOptions,
    _OutputFolders,
    finish_interrupted,
    parse_preempt_metadata,
    run_on_devices,
)
from ..registry import DEFAULT_BACKBONE, DEFAULT_CLASSIFIER, get_model_config
from ..revert import Reverter, white_box_settings
from . import _common as c

_logger = logging.getLogger("preempt_cli.cli")

PathsArg = Annotated[
    list[str],
    typer.Argument(metavar="PATH...", help="Image files, folders (recursive), globs, or - to read paths from stdin."),
]


def backbone_option(help_text: str) -> Any:
    """``-b/--backbone`` (env ``PREEMPT_BACKBONE``), with the help of the command that takes it."""
    return Annotated[Optional[str], typer.Option("--backbone", "-b", metavar="NAME", envvar="PREEMPT_BACKBONE", show_envvar=True,
                                                 help=help_text)]  # fmt: skip


def classifier_option(help_text: str) -> Any:
    """``-c/--classifier`` (env ``PREEMPT_CLASSIFIER``), with the help of the command that takes it."""
    return Annotated[Optional[str], typer.Option("--classifier", "-c", metavar="NAME", envvar="PREEMPT_CLASSIFIER", show_envvar=True,
                                                 help=help_text)]  # fmt: skip


BackboneOpt = backbone_option("Robust model that shapes the perturbation: your key (see 'preempt models list'; "
                              "default: the built-in preempt-resnet20-at, which is public).")
ClassifierOpt = classifier_option("Accurate model that labels the images (with --labels classifier; default: the "
                                  "built-in preempt-resnet20-std when the backbone is a CIFAR-10 model).")
LabelsOpt = Annotated[
    str,
    typer.Option("--labels", help="Where labels come from: classifier, backbone, folders (ImageFolder class "
                 "folders), or a CSV/JSON file of file,label."),
]  # fmt: skip
PresetOpt = Annotated[
    str, typer.Option("--preset", help=f"Named settings: {', '.join(PRESETS)} (paper: eta 0.7, F1-B2, N 20).")
]
EpsOpt = Annotated[Optional[str], typer.Option("--eps", help="L-inf budget: 8/255, 0.0314, or a whole number of "
                                                "levels (8 = 8/255; 1 = 1/255) (default: the paper's for the "
                                                "backbone's dataset, 8/255 CIFAR-10, 4/255 ImageNet).")]
EtaOpt = Annotated[Optional[float], typer.Option("--eta", help="Learning rate eta (default: from --preset).")]
ForwardOpt = Annotated[Optional[int], typer.Option("--forward", help="Forward steps T-> (default: from --preset).")]
BackwardOpt = Annotated[Optional[int], typer.Option("--backward", help="Backward steps T<- (default: from --preset).")]
SamplesOpt = Annotated[Optional[int], typer.Option("--samples", "-n", help="Noise samples N per step (default: from --preset).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the noise; same seed + device = same output.")]
PrecisionOpt = Annotated[
    str,
    typer.Option("--precision", help="Backbone passes in fp32, bf16 (autocast; 1.4-1.6x the fp32 rate measured "
                 "on an H100, 1.8-2.0x on a CPU with AVX512-BF16, 2.1-2.6x with AMX), or auto (bf16 where native)."),
]  # fmt: skip
BatchOpt = Annotated[
    Optional[int],
    typer.Option("--batch-size", help="Images per batch at the backbone's input size (larger images: fewer) "
                 "(default: automatic)."),
]  # fmt: skip
OutDirOpt = Annotated[
    Optional[Path],
    typer.Option("--out-dir", "-o", metavar="DIR", parser=c.folder_path, help="Write outputs here, mirroring the input tree."),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs (also those made from other "
                                  "content or with other settings); process preempt outputs named directly (folder "
                                  "walks always leave them out).")]
RevertOverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", help="Replace existing outputs (also those made from other content or with other settings); "
    "revert files that are reversions already when named directly (folder walks always leave out "
    "*.reverted.png).")]  # fmt: skip
RevertBackboneOpt = backbone_option("Robust model of the reversion (black-box: one of the attacker's own; see "
                                    "'preempt models list'). Refused with --white-box, which takes the one recorded "
                                    "in each file.")
RevertClassifierOpt = classifier_option("Model that labels the images (with --labels classifier). Refused with "
                                        "--white-box, which takes the one recorded in each file.")
MaxPixelsOpt = Annotated[
    int, typer.Option("--max-pixels", help="Refuse larger images (decompression-bomb protection).")
]
Print0Opt = Annotated[
    bool, typer.Option("--print0", "-0", help="End each output path with a NUL instead of a newline (as find "
                       "-print0; for xargs -0 and names with newlines).")
]  # fmt: skip
WorkersOpt = Annotated[
    Optional[int],
    typer.Option("--workers", help="Threads or processes (--io) decoding and encoding images (default: one per CPU, "
                 "2 to 8)."),
]
FsyncOpt = Annotated[
    bool,
    typer.Option("--fsync/--no-fsync", help="Flush each output to disk before renaming it into place. --no-fsync "
                 "is faster on slow disks; a power loss may then leave empty outputs, which a re-run redoes."),
]  # fmt: skip
IoOpt = Annotated[
    str,
    typer.Option("--io", help="Decode and encode files on threads, in processes (no shared GIL: faster for "
                 "small images on a GPU), or auto (processes when computing on a GPU with 4+ workers, where a fork "
                 "server can start them: not on Windows)."),
]  # fmt: skip
CompileOpt = Annotated[
    str,
    typer.Option("--compile", help="torch.compile the backbone: off, default, reduce-overhead (CUDA graphs) or "
                 "max-autotune. Compiling takes seconds to minutes per image size: worth it for large runs on GPU."),
]  # fmt: skip
CudaGraphsOpt = Annotated[
    bool,
    typer.Option("--cuda-graphs/--no-cuda-graphs", help="On a GPU, replay each batch's kernels as one CUDA graph "
                 "(the same results, far fewer launches for the host). Not with --compile."),
]  # fmt: skip
ShardOpt = Annotated[
    Optional[str],
    typer.Option("--shard", metavar="K/N", help="Process only shard K of N (K/N): a stable partition for job arrays."),
]


def _setup_torch(device_spec: str) -> torch.device:
    """The one device of revert, eval, train and keygen (of a list or ``all``: the first), with the CPU
    configured (threads, allocator: :func:`~preempt_cli.device.configure_cpu`) where it is the device."""
    device = c.one_device(device_spec)
    c.log_only(f"computing on {device}", logging.DEBUG)  # the --log file's (-vv's stderr is as before)
    if device.type == "cpu":
        configure_cpu()
    return device


def _labels(value: str) -> str | LabelMap:
    if value in ("classifier", "backbone", "folders"):
        return value
    path = expand_home(value)
    if not (os.path.isfile(path) or is_fifo(path)):  # a pipe too: --labels <(make-labels)
        raise ConfigError(f"--labels must be classifier, backbone, folders or a label file; {value!r} is none")
    return read_label_file(path)


def _config(preset: str, eps: str | None, eta: float | None, forward: int | None, backward: int | None,
            samples: int | None, *, backbone: str, registry: list[Path] | None) -> ForeBackConfig:  # fmt: skip
    """The settings of a run; without --eps, the paper's budget for the backbone's dataset."""
    try:
        dataset = get_model_config(backbone, registry or ()).dataset
    except UnknownModelError:  # reported where the model is loaded
        dataset = None
    return ForeBackConfig.from_preset(preset, dataset=dataset, eps=parse_eps(eps) if eps is not None else None,
                                      eta=eta, forward_steps=forward, backward_steps=backward, samples=samples)  # fmt: skip


def _defaults(backbone: str | None, classifier: str | None, label_source: Any,
              registry: list[Path] | None, *, required: bool = True) -> tuple[str, str | None]:  # fmt: skip
    """The built-in backbone when none is given; the built-in classifier when labels come from a classifier,
    none is given, and the backbone labels the same dataset (else a usage error if ``required``)."""
    if backbone is None:
        backbone = DEFAULT_BACKBONE
        _logger.info("no --backbone: using the built-in %s (public; make your own key with 'preempt keygen')", backbone)
    if label_source == "classifier" and classifier is None:
        try:
            same = get_model_config(backbone, registry or ()).dataset == get_model_config(DEFAULT_CLASSIFIER, registry or ()).dataset
        except UnknownModelError:
            if required:
                raise
            return backbone, classifier  # reported where the model is loaded, after the other arguments
        if same:
            classifier = DEFAULT_CLASSIFIER
        elif required:
            raise ConfigError("no classifier: pass --classifier NAME, or --labels backbone|folders|FILE")
    return backbone, classifier


def _load(name: str, device: torch.device, models_dir: Path | None, registry: list[Path] | None) -> ImageModel:
    return load_model(name, device=device, models_dir=models_dir, registry=registry or ())


def _model_cache(device: torch.device, models_dir: Path | None, registry: list[Path] | None) -> Callable[[str], ImageModel]:
    """A loader that loads each registered model once, and tries a model that failed to load only once (a
    white-box reversion asks for the recorded models once per group of settings: each try of a model
    missing from the Hub's cache took 24 s of retries)."""
    cache: dict[str, ImageModel] = {}
    failed: dict[str, PreemptError] = {}

    def load(name: str) -> ImageModel:
        if name in failed:
            raise failed[name]
        if name not in cache:
            try:
                cache[name] = _load(name, device, models_dir, registry)
            except PreemptError as e:
                failed[name] = e
                raise
        return cache[name]

    return load


def _drive(results: Iterable[FileResult], total: int, *, run: c.CommandRun, verb: str, json_out: bool, quiet: bool,
           print0: bool = False) -> int:  # fmt: skip
    """Print results as they come (stdout: output paths, one a line or NUL-terminated with ``print0``, or
    JSON lines), progress and summary (stderr); return the exit code. ``run``, begun saying
    :data:`~._common.NOTHING_WRITTEN` of a stop, says :data:`~._common.OUTPUTS_COMPLETE` from the first output
    written."""
    counts = {"done": 0, "skipped": 0, "failed": 0}
    start = time.perf_counter()
    # the bar moves once a file: a 24-megapixel photo on a CPU is a minute at 0/1, so the spinner and the
    # elapsed time show the run is alive
    progress = c.progress_bar(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(), quiet=quiet,
    )  # fmt: skip
    with progress:
        task = progress.add_task(verb.capitalize(), total=total, rate="")

        last_reported: FileResult | None = None  # the latest result counted (and listed on stdout)
        closed_stdout: BrokenPipeError | None = None  # the reader of stdout went away: results are counted only
        def list_result(result: FileResult) -> None:
            if json_out:
                c.print_json(result.as_dict())
            elif result.status == "done":
                c.print_line(c.shown_path(result.output), end="\0" if print0 else "\n")

        def report(result: FileResult) -> None:
            nonlocal last_reported, closed_stdout
            with c.listing():
                # counted before it is listed: a file whose line meets a closed stdout is on disk all the same
                counts[result.status] += 1
                last_reported = result
                if result.status == "done":
                    run.interrupted = c.OUTPUTS_COMPLETE
                if closed_stdout is None:
                    try:
                        list_result(result)
                    except BrokenPipeError as e:  # the run stops once this result is told (see below)
                        closed_stdout = e
            if result.status == "failed":
                c.error_line(str(result.reason), head=str(result.input))
            elif result.status == "skipped":
                if quiet or json_out:  # said in the --log file alone
                    c.log_only(f"skipped {c.one_line(str(result.input))}: {result.reason}")
                else:
                    _logger.info("skipped %s: %s", result.input, result.reason)
            for note in result.warnings or ():
                _logger.warning("%s: %s", c.one_line(str(result.input)), note)
            # (a no-op where no bar is shown: see progress_bar)
            progress.update(task, advance=1, rate=_rate(counts["done"], time.perf_counter() - start, "img/s", "s/img"))

        results = iter(results)
        result: FileResult | None = None
        interrupted = False
        try:
            for result in results:
                report(result)
                if closed_stdout is not None and not c.stop_signalled():
                    break  # stopped below as by a stop (a run a stop reached stops itself: its results come on)
        except KeyboardInterrupt:
            # Ctrl-C that came while this loop, not the run, held the thread: the run still has to stop as
            # it does when the interrupt reaches it (finishing and reporting the files being written); a
            # result it came before the listing of is listed now (its file is on disk)
            if result is not None and result is not last_reported:
                report(result)
            interrupted = True
        if interrupted or closed_stdout is not None:
            # a stop (or a reader of stdout gone: no more batches) finishes the files being written, whose
            # results count in the summary (listed where stdout still takes them)
            for result in finish_interrupted(results):
                report(result)
    # a stopped run's too: what it did, before the error line that says it stopped (with -q, in the --log
    # file alone)
    _summary(verb, counts, time.perf_counter() - start, quiet)
    if closed_stdout is not None:  # (after a Ctrl-C too: handle_errors points stdout at /dev/null first)
        raise closed_stdout
    if interrupted:
        raise KeyboardInterrupt
    return c.EXIT_FAILURES if counts["failed"] else c.EXIT_OK


#: Said at the first Ctrl-C (or SIGTERM): finishing a batch can take minutes (a 24-megapixel photo on a CPU),
#: and a run that stopped answering looked hung.
STOPPING = "stopping: finishing the files being computed and written (Ctrl-C twice more to quit at once)"


def _rate(done: int, elapsed: float, per_second: str, per_item: str) -> str:
    """``done`` files in ``elapsed`` seconds as a rate: photos on a CPU take seconds each, where "0.0 img/s"
    would say nothing."""
    if not done or elapsed <= 0:
        return ""
    return f"{done / elapsed:.1f} {per_second}" if done >= elapsed else f"{elapsed / done:.1f} {per_item}"


def _summary(verb: str, counts: dict[str, int], elapsed: float, quiet: bool = False) -> None:
    rate = _rate(counts["done"], elapsed, "images/s", "s per image")
    c.note(f"{verb.capitalize()} {counts['done']}, skipped {counts['skipped']}, failed {counts['failed']} "
           f"in {elapsed:.1f} s{f' ({rate})' if rate else ''}.", shown=not quiet)  # fmt: skip


def _in_shard(items: list[InputFile], options: RunOptions) -> tuple[int, dict[InputFile, Path | str]]:
    """How many of ``items`` the run's ``--shard`` takes (the progress bar's total: all the inputs' put a
    shard's finished bar at 1/N of its end, and its time left at N times the real one), and the outputs
    assigned to tell that, which the run takes (it would otherwise assign them again)."""
    outputs = assign_outputs(items, suffix=options.suffix, out_dir=options.out_dir)
    if options.shard is None:
        return len(items), outputs
    return sum(in_shard(item, options.shard, outputs[item], options.out_dir) for item in items), outputs


def _workers(workers: int | None) -> dict[str, int]:
    """``RunOptions`` keyword for ``--workers`` (none: its default, one thread per CPU)."""
    return {} if workers is None else {"workers": workers}


def _collect(paths: list[str], skip_markers: tuple[str, ...] = OUTPUT_MARKERS, *, suffix: str = "",
             kind: str | None = None) -> list[InputFile]:  # fmt: skip
    """The inputs; folder walks leave out preempt's outputs: the usual names, and PNGs named with this run's
    ``--suffix`` that carry preempt's metadata (else a second run with ``--suffix _safe --overwrite`` would
    protect ``a_safe.png`` again). Only those: an original that merely ends like the suffix
    (``banner-v2.png`` with ``--suffix -v2``) is still an input."""
    stdin = None
    if "-" in paths:  # read here, to tell a list that named nothing from one whose paths held no image
        stdin = io.StringIO(_stdin_text())
    items = without_suffixed_outputs(collect_inputs(paths, skip_markers=skip_markers, stdin=stdin), suffix, skip_markers,
                                     kind)  # fmt: skip
    # only ``-``, and nothing listed: a pipeline that found nothing (new) has nothing to do, not an error;
    # a folder listed on stdin without images is the usage error a folder named on the command line is
    nothing_listed = all(p == "-" for p in paths) and stdin is not None and not paths_listed(stdin.getvalue())
    if not items and not nothing_listed:
        raise ConfigError(f"no images found in {_some_of(paths, stdin)}")
    return items


def _stdin_text() -> str:
    """The list of paths on stdin, read as bytes (a name that is not UTF-8 keeps its bytes, whatever the
    locale; an image piped in by mistake is told apart: see :func:`path_list_text`)."""
    if sys.stdin is None:  # no stdin at all (a daemon, pythonw): an empty list
        return ""
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:
        return path_list_text(os.fsencode(sys.stdin.read()))
    # Windows: a pipe carries the console's code page, which stdin's own codec reads (os.fsdecode is UTF-8)
    return path_list_text(raw.read(), encoding=(sys.stdin.encoding or "utf-8") if os.name == "nt" else None)


def _some_of(paths: list[str], stdin: io.StringIO | None, most: int = 3) -> str:
    """The paths of a run, as given (those listed on stdin in place of ``-``), for a message: the first
    ``most`` and how many more (a list on stdin may be long)."""
    named: list[str] = []
    for path in paths:
        named.extend(paths_listed(stdin.getvalue()) if path == "-" and stdin is not None else [path])
    shown = ", ".join(named[:most])
    return shown if len(named) <= most else f"{shown} and {len(named) - most} more"


def _nothing_listed(verb: str, quiet: bool) -> None:
    """End a run given only ``-`` that read no image paths from stdin: exit 0, with a note."""
    c.note(f"No image paths on stdin: nothing to {verb}.", shown=not quiet)
    raise typer.Exit(c.EXIT_OK)


def _check_run(out_dir: Path | None, max_pixels: int, json_out: bool, print0: bool) -> None:
    """Usage errors of protect and revert found before any model loads or image is computed.

    Raises:
        ConfigError: an option value that cannot work.
    """
    if max_pixels < 1:
        raise ConfigError(f"--max-pixels must be >= 1 (got {max_pixels})")
    if json_out and print0:
        raise ConfigError("--print0 and --json exclude each other (JSON lines never hold a raw newline)")
    # before any file is read: the walks and revert --white-box read metadata before the first decode
    lift_pillow_pixel_limit(max_pixels)
    c.check_stdout()  # ``>&-``: found before any work, not at the first result
    c.check_out_dir(out_dir)


PROTECT_EPILOG = """\
[bold]Examples[/]

  preempt protect ./photos

  preempt protect ./photos --backbone preact18 --classifier resnext29-augmix
      (the paper's models: convert their weights first, see 'preempt models convert --help')

  preempt protect img.jpg -b cifar10-resnet20-pgdat-a -c cifar10-resnet18-std --models-dir ../shared/models

  preempt protect ./dataset --labels folders -b cifar10-resnet20-pgdat-a --out-dir ./protected --json \\
      --models-dir ../shared/models

  find . -name '*.jpg' | preempt protect - -b my-key --labels backbone --shard 2/8 -q
"""


def protect(
    paths: PathsArg,
    backbone: BackboneOpt = None,
    classifier: ClassifierOpt = None,
    labels: LabelsOpt = "classifier",
    preset: PresetOpt = "paper",
    eps: EpsOpt = None,
    eta: EtaOpt = None,
    forward: ForwardOpt = None,
    backward: BackwardOpt = None,
    samples: SamplesOpt = None,
    seed: SeedOpt = 0,
    precision: PrecisionOpt = "fp32",
    compile: CompileOpt = "off",
    cuda_graphs: CudaGraphsOpt = False,
    device: c.DevicesOpt = "auto",
    batch_size: BatchOpt = None,
    out_dir: OutDirOpt = None,
    suffix: Annotated[str, typer.Option("--suffix", help="Output name: <stem><suffix>.png.")] = PROTECTED_SUFFIX,
    overwrite: OverwriteOpt = False,
    shard: ShardOpt = None,
    workers: WorkersOpt = None,
    fsync: FsyncOpt = True,
    io: IoOpt = "auto",
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    models_dir: c.ModelsDirOpt = None,
    registry: c.RegistryOpt = None,
    json_out: c.JsonOpt = False,
    print0: Print0Opt = False,
    quiet: c.QuietOpt = False,
    verbose: c.VerboseOpt = 0,
    log: c.LogOpt = None,
) -> None:
    """Protect images with Fast Preemption; writes <stem>.protected.png next to each original."""
    c.setup_logging(verbose, quiet)
    with c.handle_errors(c.NOTHING_WRITTEN, stopping=STOPPING) as run:
        _check_run(out_dir, max_pixels, json_out, print0)
        config = _config(preset, eps, eta, forward, backward, samples, backbone=backbone or DEFAULT_BACKBONE,
                         registry=registry)  # fmt: skip
        label_source = _labels(labels)
        options = Protector.run_options(RunOptions(out_dir=out_dir, suffix=suffix, overwrite=overwrite,
                                                   batch_size=batch_size, max_pixels=max_pixels,
                                                   shard=parse_shard(shard), fsync=fsync, io=io, **_workers(workers)))  # fmt: skip
        backbone, classifier = _defaults(backbone, classifier, label_source, registry)
        if classifier is not None and classifier == backbone:
            _logger.warning("classifier and backbone are the same model; the method expects them to differ")
        items = _collect(paths, suffix=suffix, kind=Protector.kind)
        if not items:
            _nothing_listed("protect", quiet)
        devices = resolve_devices(device)
        c.log_only(f"protecting {len(items)} file(s) on {', '.join(map(str, devices))} with {backbone} and "
                   f"{classifier or 'no classifier'} (labels: {labels}, seed {seed}, precision {precision}): "
                   f"{config.as_dict()}", logging.DEBUG)  # the --log file's (-vv's stderr is as before)
        total, outputs = _in_shard(items, options)
        if any(d.type == "cpu" for d in devices):
            configure_cpu()
        protectors = [  # one worker per device, each with its own copies of the models
            Protector(_load(backbone, d, models_dir, registry),
                      _load(classifier, d, models_dir, registry) if label_source == "classifier" else None,
                      config=config, seed=seed, labels=label_source, preset=preset, precision=precision,
                      compile=compile, cuda_graphs=cuda_graphs)
            for d in devices
        ]  # fmt: skip
        try:
            code = _drive(run_on_devices(protectors, items, options, outputs=outputs), total, run=run,
                          verb="protected", json_out=json_out, quiet=quiet, print0=print0)  # fmt: skip
        finally:
            for protector in protectors:
                protector.close()
    raise typer.Exit(code)


REVERT_EPILOG = """\
[bold]Examples[/]

  preempt revert ./photos --white-box

  preempt revert ./photos/*.protected.png --white-box

  preempt revert img.protected.png --backbone cifar10-resnet20-pgdat-b --classifier cifar10-resnet18-std \\
      --models-dir ../shared/models

With --white-box, the backbone, classifier, settings and seed come from each file's metadata; a folder walk
skips the files without it (the originals), while files named directly fail.
"""


#: Why a file found by a folder walk is left out of a white-box reversion.
NOT_PROTECTED = "not protected by preempt"


def _may_be_an_original(item: InputFile) -> bool:
    """Whether ``item``, when it carries no preempt metadata, is no protected image at all, and so left out
    of a white-box reversion: found by a folder walk (a file named directly is meant), and not named as
    protect's outputs are (``*.protected.png``: one whose metadata was stripped fails with the reason)."""
    return item.root is not None and not (item.path.suffix.lower() == ".png"
                                          and item.path.stem.endswith(PROTECTED_SUFFIX))  # fmt: skip


WhiteBoxGroup = tuple[dict[str, Any] | None, str | None, bool, list[InputFile]]


def _unreadable(item: InputFile, max_pixels: int) -> str | None:
    """Why a file named for ``--white-box`` without preempt's metadata cannot be read at all (None: it can,
    it just is no protected image). A pipe cannot: its metadata is read first, then its pixels, and a pipe
    is read once."""
    if is_fifo(item.path):  # (gone: read_images says so)
        return "a pipe: --white-box reads a file's metadata, then its pixels; save it to a file first"
    read = read_images([str(item.path)], max_pixels)[0]  # its pixels decoded too: a truncated file fails only there
    return read_failure(item, read) if isinstance(read, str) else None


def _white_box_groups(items: list[InputFile], max_pixels: int, overwrite: bool = False) -> Iterator[WhiteBoxGroup]:
    """Group inputs by the defense recorded in their metadata: (metadata, why it cannot be used, whether
    its files are skipped rather than failed, files).

    Files of a folder walk that are no protected images (the originals beside them, preempt's reverted
    images) are skipped; files named directly fail with the reason, but reversion outputs, which both
    commands skip unless ``overwrite`` asks for them."""
    import json

    groups: dict[str, WhiteBoxGroup] = {}
    for item in items:
        raw = read_png_text(item.path, key=METADATA_KEY).get(METADATA_KEY)  # read once: a PNG original is decoded
        meta = parse_preempt_metadata(raw)
        problem = "no preempt metadata (not protected by preempt?): revert it black-box with --backbone NAME"
        skip = False
        if meta is None:
            if raw is not None:  # edited or damaged: saying it has none would send the user looking elsewhere
                problem = "preempt metadata that is not a valid record (edited or damaged): revert it black-box"
            elif _may_be_an_original(item):
                problem, skip = NOT_PROTECTED, True
            else:  # named directly: a file gone, damaged or no image fails with its read's own reason
                problem = _unreadable(item, max_pixels) or problem
        elif meta.get("kind") != "protected":
            problem = f"not a protected image (preempt metadata of a {excerpt(meta.get('kind'))} image)"
            # a reversion's output named directly is skipped as a black-box reversion skips it (it failed, exit
            # 1); --overwrite asks for it, which a white-box reversion cannot do without a protected file's record
            skip = item.root is not None or (meta.get("kind") in Reverter.skipped_kinds and not overwrite)
            if skip and item.root is None:
                problem = "already reverted by preempt (a white-box reversion takes protected images)"
            meta = None
        else:
            try:
                settings = white_box_settings(meta)
                problem = None
            except KeyError as e:
                meta, problem = None, f"preempt metadata without the setting {e.args[0]!r}: revert it black-box"
            except ValueError as e:
                meta, problem = None, str(e)
        # the models' hashes and setups too: files protected by other weights of one name, or under a registry
        # row set up otherwise, are told apart, checked and counted (one group's first file stood for them all)
        models = [f"{role}{part}" for role in ("backbone", "classifier")
                  for part in ("", "_sha256", "_sha256_of", "_setup")]  # fmt: skip
        key = f"{skip}:{problem}" if meta is None else json.dumps(
            {k: meta.get(k) for k in (*models, "labels", "seed", "preset")} | settings,
            sort_keys=True, default=str,
        )  # fmt: skip
        groups.setdefault(key, (meta, problem, skip, []))[3].append(item)
    yield from groups.values()


def _other_weights(meta: dict[str, Any], role: str, loaded: Any, state_digests: dict[Any, str]) -> str | None:
    """The sha256 of ``loaded`` where it holds other weights than the ``role`` that protected a file (None:
    the same, or nothing to compare), by the sha256 recorded compared with the loaded model's of the same
    thing (``<role>_sha256_of``): a file's with its weights file's, a state's (a model without a file: timm's
    own weights, a net of the caller's) with its state's. The state's is computed only where a record asks
    for it, once per model (``state_digests``: seconds for a large one). A file's cannot be compared with a
    model without one; a record older than ``_sha256_of`` is compared with the loaded model's file's (where
    it has one), as it was."""
    recorded = meta.get(f"{role}_sha256")
    if not recorded:
        return None
    if meta.get(f"{role}_sha256_of") == "state":  # no file's sha256 equals it: a model without a file went unchecked
        if loaded not in state_digests:
            state_digests[loaded] = state_sha256(loaded)
        return state_digests[loaded] if recorded != state_digests[loaded] else None
    return loaded.weights_sha256 if loaded.weights_sha256 and recorded != loaded.weights_sha256 else None


def _white_box_reverter(meta: dict[str, Any], model: Callable[[str], Any], seed: int | None, precision: str | None,
                        compile: str, files: int, state_digests: dict[Any, str] | None = None, *,
                        allow_changed_models: bool = False) -> Reverter:  # fmt: skip
    """The defense recorded in a protected file, as its attacker would run it again: its models, settings
    and seed (``seed`` and ``precision``, where given, replace the recorded ones). ``state_digests``: the
    loaded models' state sha256 found so far in the run (see :func:`_other_weights`). A recorded model name
    that now loads other weights, or the same weights under a registry row set up otherwise, is refused: the
    reversion would be black-box under a white-box name; ``allow_changed_models`` runs it, with a warning.

    Raises:
        PreemptError, TypeError, ValueError: a recorded model cannot be loaded or has changed, or a setting is
            not valid.
    """
    for role in ("backbone", "classifier"):  # edited metadata: a number or null is no model's name
        name = meta.get(role)
        if (role == "backbone" or name is not None) and not (isinstance(name, str) and name):
            raise ValueError(f"recorded {role} {excerpt(name)} is not a model name (edited metadata?): revert it "
                             "black-box")
    bb = model(meta["backbone"])
    # Ground-truth labels of the defender are not the attacker's to have: without a recorded
    # classifier, the attacker labels with the backbone.
    clf = model(meta["classifier"]) if meta.get("classifier") else None
    state_digests = {} if state_digests is None else state_digests
    changed: list[str] = []
    for role, loaded in (("backbone", bb), ("classifier", clf)):  # the same names, other weights: no white box
        setup = meta.get(f"{role}_setup")
        other = None if loaded is None else _other_weights(meta, role, loaded, state_digests)
        if other:
            changed.append(f"{role} {loaded.name} differs from the weights that protected {files} file(s) (sha256 "
                           f"{other[:12]}... loaded, {str(meta[f'{role}_sha256'])[:12]}... recorded)")  # fmt: skip
        elif loaded is not None and setup and setup != loaded.config.setup_sha256:  # a row fixed since
            changed.append(f"{role} {loaded.name} is set up otherwise (registry row: architecture, normalization or "
                           f"classes) than the model that protected {files} file(s)")  # fmt: skip
    # a white-box reversion is the recorded defense run again; with other models it is a black-box one whose
    # result (reverted or not) would be read as the key's: a warning scrolled past in a batch run with exit 0
    if changed and not allow_changed_models:
        raise ValueError(f"{'; '.join(changed)}: reverting with them would be black-box, not white-box (restore "
                         "the recorded weights or registry row, or pass --allow-changed-models)")  # fmt: skip
    for change in changed:
        _logger.warning("%s", change)
    settings = white_box_settings(meta)
    recorded_precision = settings.pop("precision")
    if seed is None:
        if "seed" not in meta:  # every version records it: edited metadata, or another tool's
            raise ValueError("the metadata records no seed: give the defender's with --seed")
        seed = meta["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"recorded seed {excerpt(seed)} is not an integer")
    return Reverter(bb, clf, config=ForeBackConfig(**settings), seed=seed,
                    labels="classifier" if clf is not None else "backbone", preset=meta.get("preset"),
                    precision=precision or recorded_precision, compile=compile)  # fmt: skip


def _log_reversion(reverter: Reverter, files: int, white_box: bool) -> None:
    """Say in the --log file (alone) the settings a reversion runs with, as resolved: the budget a
    black-box one takes from its backbone's dataset, and the defense --white-box read from its files."""
    settings = reverter.run_settings()
    # the preset as recorded: a white-box config, built from the recorded values, names none
    config = reverter.config.as_dict() | {"preset": reverter.preset}
    how = " white-box" if white_box else ""
    source = " with the defense recorded in them:" if white_box else " with"
    c.log_only(f"reverting {files} file(s){how} on {reverter.device}{source} {settings['backbone']} and "
               f"{settings['classifier'] or 'no classifier'} (labels: {settings['labels']}, seed {reverter.seed}, "
               f"precision {reverter.precision}): {config}", logging.DEBUG)  # fmt: skip


#: Options a white-box reversion takes from each file's metadata instead (parameter: option).
WHITE_BOX_RECORDED = {"backbone": "--backbone", "classifier": "--classifier", "labels": "--labels",
                      "preset": "--preset", "eps": "--eps", "eta": "--eta", "forward": "--forward",
                      "backward": "--backward", "samples": "--samples"}  # fmt: skip


def _check_white_box(ctx: typer.Context) -> None:
    """Refuse settings given on the command line that a white-box reversion would ignore (those of the
    environment, ``PREEMPT_BACKBONE`` and ``PREEMPT_CLASSIFIER``, are for protect: they are ignored).

    Raises:
        ConfigError: such an option was given.
    """
    given = c.given_on_command_line(ctx, WHITE_BOX_RECORDED)
    if given:
        them = "it" if len(given) == 1 else "them"
        raise ConfigError(f"--white-box takes {', '.join(given)} from each file's metadata; drop {them} "
                          "(or revert black-box with --backbone NAME)")  # fmt: skip


def revert(
    ctx: typer.Context,
    paths: PathsArg,
    white_box: Annotated[bool, typer.Option("--white-box", help="Use the backbone, classifier and settings "
                                            "recorded in each protected PNG (the attacker holds the key).")] = False,
    allow_changed_models: Annotated[bool, typer.Option(
        "--allow-changed-models", help="--white-box: revert with a recorded model name that now loads other weights "
        "(sha256) or is set up otherwise (registry row) than the model that protected the file, with a warning "
        "(refused by default: such a reversion is black-box).")] = False,
    backbone: RevertBackboneOpt = None,
    classifier: RevertClassifierOpt = None,
    labels: LabelsOpt = "classifier",
    preset: PresetOpt = "paper",
    eps: EpsOpt = None,
    eta: EtaOpt = None,
    forward: ForwardOpt = None,
    backward: BackwardOpt = None,
    samples: SamplesOpt = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of the noise (default: 0; --white-box: the "
                                                "seed recorded in each file).")] = None,
    precision: Annotated[
        Optional[str], typer.Option("--precision", help="fp32, bf16 or auto (default: fp32; --white-box: as recorded).")
    ] = None,
    compile: CompileOpt = "off",
    device: c.DeviceOpt = "auto",
    batch_size: BatchOpt = None,
    out_dir: OutDirOpt = None,
    suffix: Annotated[str, typer.Option("--suffix", help="Output name: <stem><suffix>.png.")] = REVERTED_SUFFIX,
    overwrite: RevertOverwriteOpt = False,
    shard: ShardOpt = None,
    workers: WorkersOpt = None,
    fsync: FsyncOpt = True,
    io: IoOpt = "auto",
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    models_dir: c.ModelsDirOpt = None,
    registry: c.RegistryOpt = None,
    json_out: c.JsonOpt = False,
    print0: Print0Opt = False,
    quiet: c.QuietOpt = False,
    verbose: c.VerboseOpt = 0,
    log: c.LogOpt = None,
) -> None:
    """Preemptive Reversion (x~ = 2 x^r - D(x^r)): white-box with the same backbone, black-box with another."""
    c.setup_logging(verbose, quiet)
    with c.handle_errors(c.NOTHING_WRITTEN, stopping=STOPPING) as run:
        _check_run(out_dir, max_pixels, json_out, print0)
        options = Reverter.run_options(RunOptions(out_dir=out_dir, suffix=suffix, overwrite=overwrite,
                                                  batch_size=batch_size, max_pixels=max_pixels,
                                                  shard=parse_shard(shard), fsync=fsync, io=io, **_workers(workers)))  # fmt: skip
        if white_box:
            _check_white_box(ctx)
            if seed is not None:  # before any work, as protect and a black-box reversion check them
                check_seed(seed)
            if precision is not None and precision not in PRECISIONS:
                raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        elif backbone is None:
            raise ConfigError("pass --white-box, or --backbone NAME for a black-box reversion")
        elif allow_changed_models:  # a black-box reversion compares no weights: the flag would do nothing
            raise ConfigError("--allow-changed-models is for --white-box, which compares the recorded models")
        items = _collect(paths, skip_markers=Reverter.skip_markers, suffix=suffix, kind=Reverter.kind)
        if not items:
            _nothing_listed("revert", quiet)
        total, outputs = _in_shard(items, options)
        model = _model_cache(_setup_torch(device), models_dir, registry)

        def runs() -> Iterator[FileResult]:
            if not white_box:
                label_source = _labels(labels)
                if label_source == "classifier" and classifier is None:
                    raise ConfigError("no classifier: pass --classifier NAME, or --labels backbone|folders|FILE")
                config = _config(preset, eps, eta, forward, backward, samples, backbone=backbone,
                                 registry=registry)  # fmt: skip
                key = model(backbone)  # first, as protect loads them: a mistyped backbone is the error reported
                clf = model(classifier) if label_source == "classifier" else None
                reverter = Reverter(key, clf, config=config, seed=0 if seed is None else seed,
                                    labels=label_source, preset=preset, precision=precision or "fp32",
                                    compile=compile)  # fmt: skip
                _log_reversion(reverter, len(items), white_box=False)
                try:
                    yield from reverter.run(items, options, outputs=outputs)
                finally:
                    reverter.close()
                return
            # the outputs are named over every input (all shards, all defenses): per group, two groups' files
            # of one name (two folders protected with other seeds) would get one output. The shard is taken
            # here, by the outputs (see in_shard); each group's run takes all it is given
            mine = [i for i in items if in_shard(i, options.shard, outputs[i], options.out_dir)]
            group_options = dataclasses.replace(options, shard=None)
            folders = _OutputFolders()  # the groups' outputs share folders: one probe each, one stop of a full disk
            state_digests: dict[Any, str] = {}  # the loaded models' state sha256, where a group's record asks
            for meta, problem, skip, group in _white_box_groups(mine, options.max_pixels, options.overwrite):
                if meta is None:
                    for item in group:
                        yield FileResult(item.path, "skipped" if skip else "failed", reason=problem)
                    continue
                try:
                    reverter = _white_box_reverter(meta, model, seed, precision, compile, len(group), state_digests,
                                                   allow_changed_models=allow_changed_models)
                except (PreemptError, TypeError, ValueError) as e:  # these files fail; other defenses go on
                    for item in group:
                        yield FileResult(item.path, "failed", reason=f"cannot rebuild the recorded defense: {e}")
                    continue
                _log_reversion(reverter, len(group), white_box=True)
                try:
                    yield from reverter.run(group, group_options, outputs=outputs, folders=folders)
                finally:
                    reverter.close()

        code = _drive(runs(), total, run=run, verb="reverted", json_out=json_out, quiet=quiet, print0=print0)
    raise typer.Exit(code)
