"""``preempt train`` and ``preempt keygen``: make your own backbone (your key) or classifier."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from ..engine import parse_eps
from .._paths import expand_home
from ..imageio import folder_write_problem
from ..errors import ConfigError, ImageReadError, PreemptError, RegistryError
from ..registry import (
    MODEL_NAME_CHARACTERS,
    ROLES,
    arch_arg_value,
    check_registrable,
    get_model_config,
    load_registry,
    register_model,
    user_registry_path,
    valid_model_name,
)
from ..train import (
    KEYGEN_DEFAULTS,
    EpochStats,
    TrainConfig,
    TrainData,
    TrainResult,
    arch_config,
    checkpoint_path,
    keygen,
    load_train_data,
    resolve_amp,
    train,
)
from . import _common as c
from ._files import _setup_torch

_logger = logging.getLogger(__name__)

TRAIN_EPILOG = """\
[bold]Examples[/]

  preempt train ../shared/data/cifar10/train-jpeg.zip --arch cifar_resnet20 --out my-backbone.safetensors

  preempt train DATA.zip --base cifar10-resnet20-std --method fgsm-rs --epochs 5 --lr 0.05 --out robust.safetensors \\
      --models-dir ../shared/models

  preempt train DATA --arch cifar_resnet20 --method standard --epochs 30 --name my-classifier --out clf.safetensors

The result is registered in your user registry (see 'preempt models list --verbose') under --name (default: the
output file's stem), so 'preempt protect --backbone NAME' can use it at once.
"""

KEYGEN_EPILOG = """\
[bold]Examples[/]

  preempt keygen --base cifar10-resnet20-pgdat-a --data ../shared/data/cifar10/train-jpeg.zip \\
      --out my-key.safetensors --models-dir ../shared/models

  preempt protect ./photos --backbone my-key --overwrite   (--overwrite: replaces the outputs of the default key)

The secret seed comes from the operating system and is not stored: keep the weights file private, it is
your key (in the paper's threat model, anyone holding it and your settings can revert your protected
images; measured here, reversion fails with or without it: see benchmarks/RESULTS.md).
"""

DataArg = Annotated[Path, typer.Argument(metavar="DATA",
                                         help="Training data: an ImageFolder directory or a zip of one.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", metavar="FILE", help="The weights file to write (.safetensors).")]
NameOpt = Annotated[
    Optional[str], typer.Option("--name", help="Register the result under this name (default: the file's stem).")
]
NoRegisterOpt = Annotated[bool, typer.Option("--no-register", help="Do not add the result to the user registry.")]
#: --overwrite, as protect names it; --force, the name these commands gave it first, still works
ForceOpt = Annotated[bool, typer.Option(
    "--overwrite", "--force", help="Replace an existing output file and registry entry (--force: its former "
    "name).")]  # fmt: skip
TrainForceOpt = Annotated[bool, typer.Option(
    "--overwrite", "--force", help="Replace an existing output file and registry entry; without --resume, start "
    "over from an interrupted run's checkpoint (--force: its former name).")]  # fmt: skip
#: train and keygen print an object per epoch, then a summary: not the other commands' "one per result"
TrainJsonOpt = Annotated[bool, typer.Option("--json", help='Print one JSON object per epoch ("event": "epoch") '
                                            'and a last one ("event": "done") on stdout.')]  # fmt: skip
#: what a re-run after Ctrl-C does: train continues from the checkpoint of the last finished epoch, keygen
#: keeps none (it would hold the secret-seeded generator's state)
TRAIN_INTERRUPTED = "run the same command with --resume to continue after the last finished epoch"
KEYGEN_INTERRUPTED = "keygen keeps no checkpoint (it would hold the secret seed's state): a re-run starts over"
#: ``train``'s defaults of --epochs and --lr, from scratch and fine-tuning a --base.
SCRATCH_EPOCHS, SCRATCH_LR = 15, 0.2
FINE_TUNE_EPOCHS, FINE_TUNE_LR = 5, 0.05
EpochsOpt = Annotated[Optional[int], typer.Option(
    "--epochs", help=f"Passes over the training data (default: {SCRATCH_EPOCHS} from scratch, {FINE_TUNE_EPOCHS} "
    "with --base).")]  # fmt: skip
LrOpt = Annotated[Optional[float], typer.Option(
    "--lr", help=f"Peak learning rate (default: {SCRATCH_LR:g} from scratch, {FINE_TUNE_LR:g} with --base).")]  # fmt: skip
KeygenEpochsOpt = Annotated[Optional[int], typer.Option(
    "--epochs", help=f"Passes over the training data (default: {KEYGEN_DEFAULTS.epochs}).")]  # fmt: skip
KeygenLrOpt = Annotated[Optional[float], typer.Option(
    "--lr", help=f"Peak learning rate (default: {KEYGEN_DEFAULTS.lr:g}).")]  # fmt: skip
HoldoutOpt = Annotated[int, typer.Option("--holdout", help="Training images set aside to measure each epoch.")]
EvalImagesOpt = Annotated[
    int, typer.Option("--eval-images", help="Held-out images measured each epoch (clean and PGD-10).")
]
AmpOpt = Annotated[str, typer.Option("--amp", help="Mixed precision: auto (bf16 where native), bf16 or off.")]
MaxBatchesOpt = Annotated[Optional[int], typer.Option("--max-batches", help="Stop each epoch after this many batches.")]


def _training_images(dataset: TrainData, holdout: int, *more: str) -> str:
    """``49,000 images (1,000 held out)``: the images trained on, not those loaded (``--holdout`` sets some
    aside first), with ``more`` in the parentheses.

    Raises:
        ConfigError: ``holdout`` leaves no training images (before the line that would say 0).
    """
    notes = [f"{holdout:,} held out"] if holdout > 0 else []
    notes += more
    return f"{dataset.training_size(holdout):,} images" + (f" ({'; '.join(notes)})" if notes else "")


def _per_epoch(config: TrainConfig) -> list[str]:
    """``at most 1 batch of 16 per epoch`` where --max-batches cuts the epochs short (the images line
    counted them all, though each epoch trains on fewer)."""
    m = config.max_batches_per_epoch
    return [f"at most {m} batch{'es' if m != 1 else ''} of {config.batch_size} per epoch"] if m else []


def _reporter(json_out: bool, quiet: bool):
    """A progress bar per epoch and one line per finished epoch: (the progress display, the callbacks to
    pass to :func:`~preempt_cli.train.train` by name)."""
    progress = c.progress_bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), quiet=quiet)  # fmt: skip
    state: dict[str, Any] = {"task": None, "epoch": 1}

    def on_epoch_start(epoch: int) -> None:  # after a resume, not 1
        state["epoch"] = epoch

    def on_batch(done: int, total: int) -> None:
        if state["task"] is None:
            state["task"] = progress.add_task(f"epoch {state['epoch']}", total=total)
        progress.update(state["task"], completed=done)

    def on_epoch(stats: EpochStats) -> None:
        if state["task"] is not None:
            progress.remove_task(state["task"])
            state["task"] = None
        if json_out:
            c.print_json({"event": "epoch", **asdict(stats)})
        else:  # with -q, in the --log file alone
            held = (f", held-out clean {stats.heldout_clean:.2f}% PGD-10 {stats.heldout_pgd:.2f}%"
                    if stats.heldout_clean is not None else "")  # fmt: skip
            c.note(f"epoch {stats.epoch}: loss {stats.train_loss:.4f}, train acc {stats.train_acc:.2f}%"
                   f"{held} ({stats.seconds:.0f} s)", shown=not quiet)  # fmt: skip

    return progress, {"on_batch": on_batch, "on_epoch": on_epoch, "on_epoch_start": on_epoch_start}


def _check_output(out: Path, force: bool, resume: bool, *, checkpoints: bool = True) -> Path:
    """``out``, checked before any data is read. ``checkpoints``: the command resumes from checkpoints
    (train; keygen keeps none)."""
    out = expand_home(out, existing_literal=False)
    if out.suffix != ".safetensors":
        raise ConfigError(f"{out}: the output must be a .safetensors file")
    _check_writable(out)
    if os.path.islink(out) and not os.path.exists(out) and not force:
        # exists() says no of it, yet the weights cannot be put there without replacing it: the whole training
        # ran, then they were refused as if another run had written the output meanwhile
        raise ConfigError(f"{out} is a symbolic link to {os.readlink(out)}, which is missing: pass --overwrite to "
                          "replace the link with the weights, or remove it")  # fmt: skip
    ckpt = checkpoint_path(out)
    if checkpoints and os.path.isfile(ckpt) and not resume and not force:  # a plain re-run would start over and overwrite it
        raise ConfigError(f"a checkpoint of an interrupted run is at {ckpt}: --resume continues it, "
                          "--overwrite starts over")  # fmt: skip
    if os.path.exists(out) and not force:
        if not resume:
            raise ConfigError(f"{out} exists; pass --overwrite to replace it")
        if not os.path.isfile(checkpoint_path(out)):  # a finished run deletes its checkpoint: training would restart
            raise ConfigError(f"--resume: {out} is finished (no checkpoint {checkpoint_path(out).name} beside "
                              "it); pass --overwrite to train it again")  # fmt: skip
    return out


def _load_data(data: Path, **kwargs: Any) -> TrainData:
    """:func:`load_train_data`, a file it cannot decode a usage error (exit 2): nothing is trained, where
    exit 1 says that some inputs failed and the rest were done.

    Raises:
        ConfigError: see :func:`load_train_data`; a training image that cannot be decoded.
    """
    try:
        return load_train_data(data, **kwargs)
    except ImageReadError as e:
        raise ConfigError(f"{e}; nothing was trained: fix or remove the file") from e


def _check_writable(out: Path) -> None:
    """Refuse an output that could not be written, now rather than when the whole training is done: a
    folder, one under a file, or one in a folder this process cannot write (a temporary file is created
    and removed there; missing folders are not created yet, their nearest existing one is tried).

    Raises:
        ConfigError: one line saying which.
    """
    if os.path.isdir(out):
        raise ConfigError(f"--out {out} is a folder: name the .safetensors file to write")
    problem = folder_write_problem(out)  # its missing folders are created when the weights are written
    if problem:
        raise ConfigError(f"--out {out}: {problem}")


def _registry_row(cfg: Any, output: Path, sha256: str, role: str, description: str) -> dict[str, Any]:
    return {
        "arch": cfg.arch,
        "arch_args": dict(cfg.arch_args) or None,
        "dataset": cfg.dataset,
        "input_size": list(cfg.input_size),
        "mean": list(cfg.mean) if cfg.mean else "none",
        "std": list(cfg.std) if cfg.std else "none",
        "classes": list(cfg.classes) if cfg.classes else None,
        "num_classes": cfg.num_classes,
        "source": f"file:{output.resolve()}",
        "sha256": sha256,
        "role": role,
        "description": description,
    }


def _check_no_register(no_register: bool, given: dict[str, Any]) -> None:
    """Refuse an option of the registry's row (``given``: option -> value, None when not given) beside
    ``--no-register``: it was ignored without a word.

    Raises:
        ConfigError: one of them was given.
    """
    option = next((o for o, value in given.items() if value is not None), None)
    if no_register and option is not None:
        raise ConfigError(f"{option} is for the registry's row, and --no-register registers nothing: drop one of "
                          "them")  # fmt: skip


def _check_role(role: str | None) -> None:
    if role is not None and role not in ROLES:
        raise ConfigError(f"--role must be one of {', '.join(ROLES)}, got {role!r}")


def _check_name(name: str | None, out: Path, force: bool) -> None:
    """Check that the result can be registered under ``name``, or without one under ``out``'s stem, which
    the user did not give as a name: its refusal says so, and what to do (the registry's said "invalid model
    name 'my key'" of ``--out 'my key.safetensors'``).

    Raises:
        ConfigError: ``out``'s stem cannot be a model's name.
        RegistryError: see :func:`check_registrable`.
    """
    if name is None and not valid_model_name(out.stem):
        raise ConfigError(f"--out {out}: its stem {out.stem!r} cannot be a model's name ({MODEL_NAME_CHARACTERS}): "
                          "give one with --name, or pass --no-register")  # fmt: skip
    check_registrable(name or out.stem, overwrite=force)


def _check_registration(name: str, role: str, cfg: Any, out: Path) -> None:
    """Register the row the run will register, with a placeholder hash, in a throwaway registry: a row the
    registry would refuse (an empty --dataset, say) fails now, not once the weights are written (when a
    re-run says they exist). A name clash is :func:`check_registrable`'s."""
    with tempfile.TemporaryDirectory(prefix="preempt-check-") as tmp:
        try:
            register_model(name, _registry_row(cfg, out, "0" * 64, role, ""), Path(tmp) / "models.toml",
                           overwrite=True)  # fmt: skip
        except RegistryError as e:
            raise ConfigError(f"cannot register the result as {name!r}: {e.reason}") from None


def _on_written(run: c.CommandRun, *, name: str, register: bool, role: str, model_cfg: Any,
                force: bool) -> Callable[[TrainResult], None]:  # fmt: skip
    """What the run does once its weights are written, before a stop (Ctrl-C, SIGTERM) meanwhile takes
    effect (see :func:`~preempt_cli.train.train`): register them, and say so if stopped from then on."""

    def written(result: TrainResult) -> None:
        if register:
            _register(result, name, role, model_cfg, force)
            run.interrupted = f"{result.output} was written and registered as {name!r}: nothing is left to do"
        else:
            run.interrupted = f"{result.output} was written: nothing is left to do"

    return written


def row_file_path(out: Path) -> Path:
    """Where the registry row of weights that could not be registered is saved: ``KEY.registry.toml``."""
    return out.with_name(f"{out.stem}.registry.toml")


def _register(result: TrainResult, name: str, role: str, base_cfg: Any, force: bool) -> None:
    """Register the weights just written in the user registry. A registration that fails now (the registry
    edited meanwhile, the name registered by another run) leaves the weights written: the error names them,
    and the registry file their row was saved to instead, to use or copy.

    Raises:
        RegistryError: the registration failed.
    """
    row = _registry_row(base_cfg, result.output, result.sha256, role, result.metadata.get("training", ""))
    try:
        register_model(name, row, overwrite=force)
    except RegistryError as e:
        raise RegistryError(e.path, f"{e.reason}; {_save_row_elsewhere(result.output, name, row)}") from None


def _save_row_elsewhere(out: Path, name: str, row: dict[str, Any]) -> str:
    """Save the row of ``out``, not registered, to :func:`row_file_path` (never over a file there); what
    to do then, said as the end of the registration's error."""
    not_registered = f"the weights were written to {out} but not registered"
    row_file = row_file_path(out)
    if os.path.lexists(row_file):
        saved = f"{row_file} exists"
    else:
        try:
            register_model(name, row, row_file, overwrite=True)  # a new file: nothing in it to replace
            return f"{not_registered}: their row is in {row_file} (use it with --registry {row_file}, or copy it " \
                   "into your registry)"  # fmt: skip
        except RegistryError as e:
            saved = e.reason
    return (f"{not_registered} (their row could not be saved: {saved}): add a [models.{name}] row with "
            f"source = \"file:{out.resolve()}\" to your registry")  # fmt: skip


def _warn_stale_pins(result: TrainResult, registry: list[Path] | None, models_dir: Path | None,
                     registered_as: str | None) -> None:  # fmt: skip
    """Warn of registered rows that load the file just written but pin another sha256 (``--overwrite`` over a
    registered model, with ``--no-register`` or registered under another name, ``registered_as``): loading
    them would now fail as if the file were corrupt."""
    from ..hub import local_candidates

    try:
        models = load_registry(registry or ())
    except PreemptError:  # a broken registry is reported by the commands that read it
        return
    written = result.output.resolve()
    for name, cfg in sorted(models.items()):
        if cfg.source.kind != "file" or not cfg.sha256 or cfg.sha256 == result.sha256:
            continue
        found = next((p for p in local_candidates(cfg, models_dir) if p.is_file()), None)
        if found is not None and found.resolve() == written:
            if registered_as is not None:  # its row stays, pinning weights that are gone
                how = (f"the new file is registered as {registered_as!r}: remove the row of {name!r}, or register "
                       "under its name")  # fmt: skip
            elif name == result.output.stem:
                how = "drop --no-register"
            else:
                how = f"use --name {name} instead of --no-register"
            _logger.warning("the registered model %r pins the old sha256 of %s, which the new file does not match "
                            "(loading it fails as corrupt); %s to update it", name, result.output, how)  # fmt: skip


def _finish(result: TrainResult, *, name: str | None, register: bool, json_out: bool, quiet: bool, started: float,
            registry: list[Path] | None = None, models_dir: Path | None = None) -> None:  # fmt: skip
    registered = user_registry_path() if register else None  # (registered once the weights were written)
    name = name or result.output.stem
    _warn_stale_pins(result, registry, models_dir, name if register else None)  # (the row registered matches)
    final = result.final
    summary = {"event": "done", "output": str(result.output), "sha256": result.sha256,
               "name": name if register else None, "registry": str(registered) if registered else None,
               "heldout_clean": final.heldout_clean if final else None,
               "heldout_pgd": final.heldout_pgd if final else None,
               "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    if json_out:
        c.print_json(summary)
        return
    c.print_line(c.shown_path(result.output))  # the result, as protect's output paths (also with -q)
    # the summary on stderr, as protect's (with -q, in the --log file alone)
    c.note(f"Trained in {summary['seconds']:.0f} s (sha256 {result.sha256[:12]}...)", shown=not quiet)
    if registered:
        c.note(f"Registered as {name!r} in {registered}", shown=not quiet)


def train_cmd(
    data: DataArg,
    out: OutOpt,
    base: Annotated[Optional[str], typer.Option("--base", metavar="NAME", help="Registered model to fine-tune.")] = None,
    arch: Annotated[
        Optional[str], typer.Option("--arch", help="Architecture to train from scratch (e.g. cifar_resnet20, or a timm name).")
    ] = None,
    arch_arg: Annotated[
        Optional[list[str]], typer.Option(
            "--arch-arg", metavar="KEY=VALUE",
            help="KEY=VALUE passed to the architecture, VALUE read as in a registry row's arch_args (numbers, "
                 "true/false, quoted text, arrays; other text as it is); repeatable.")
    ] = None,
    method: Annotated[str, typer.Option("--method", help="standard, fgsm-rs (fast AT) or pgd (PGD-AT).")] = "fgsm-rs",
    eps: Annotated[str, typer.Option("--eps", help="L-inf budget of adversarial training, e.g. 8/255 (a whole "
                                                   "number: levels, 8 = 8/255).")] = "8/255",
    step_size: Annotated[
        Optional[str], typer.Option("--step-size", help="Attack step (default: 1.25 eps for fgsm-rs, eps/4 for pgd).")
    ] = None,
    attack_steps: Annotated[int, typer.Option("--attack-steps", help="PGD-AT steps per batch.")] = 7,
    epochs: EpochsOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per training batch.")] = 128,
    lr: LrOpt = None,
    schedule: Annotated[str, typer.Option("--schedule", help="onecycle or cosine.")] = "onecycle",
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="L2 weight decay (not on BN/bias).")] = 5e-4,
    holdout: HoldoutOpt = 1000,
    eval_images: EvalImagesOpt = 500,
    input_size: Annotated[
        Optional[int], typer.Option("--input-size", help="From scratch: train at SIZE x SIZE (default: the size most of the images have).")
    ] = None,
    dataset_name: Annotated[
        Optional[str], typer.Option("--dataset", help="Dataset name recorded in the registry (default: guessed).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of initialization, data order, augmentation, attack "
                                                     "starts and dropout.")] = 0,
    amp: AmpOpt = "auto",
    max_batches: MaxBatchesOpt = None,
    name: NameOpt = None,
    role: Annotated[
        Optional[str], typer.Option("--role", help="Registry role (default: backbone for adversarial training, else classifier).")
    ] = None,
    no_register: NoRegisterOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint beside --out "
                                         "(OUT.ckpt, written after every epoch).")] = False,
    force: TrainForceOpt = False,
    device: c.DeviceOpt = "auto",
    models_dir: c.ModelsDirOpt = None,
    registry: c.RegistryOpt = None,
    json_out: TrainJsonOpt = False,
    quiet: c.QuietOpt = False,
    verbose: c.VerboseOpt = 0,
    log: c.LogOpt = None,
) -> None:
    """Train a backbone (adversarial training) or a classifier, from scratch or from a base model."""
    c.setup_logging(verbose, quiet)
    with c.handle_errors(interrupted=TRAIN_INTERRUPTED) as run:
        if (base is None) == (arch is None):
            raise ConfigError("give exactly one of --base NAME (fine-tune) or --arch ARCH (from scratch)")
        if base is not None:  # a base brings its own architecture, input size and dataset
            given = [o for o, v in (("--input-size", input_size), ("--dataset", dataset_name),
                                    ("--arch-arg", arch_arg)) if v]  # fmt: skip
            if given:
                raise ConfigError(f"{', '.join(given)}: only with --arch (a --base model brings its own)")
        if input_size is not None and input_size < 1:
            raise ConfigError(f"--input-size must be >= 1, got {input_size}")
        _check_role(role)
        _check_no_register(no_register, {"--name": name, "--role": role})
        out = _check_output(out, force, resume)
        # what the weights may replace: a file there now (--overwrite, or --resume finishing a run stopped between
        # writing them and removing its checkpoint), not one another run writes there meanwhile
        replaceable = force or os.path.exists(out)
        if resume and not os.path.isfile(checkpoint_path(out)):  # a typo in --out, another folder: not silently
            _logger.warning("--resume: no checkpoint at %s (nothing to continue): training starts at epoch 1",
                            checkpoint_path(out))  # fmt: skip
        if not no_register:  # a name that cannot be registered fails now, not after training
            _check_name(name, out, force)
        role = role or ("classifier" if method == "standard" else "backbone")
        config = TrainConfig(
            method=method, eps=parse_eps(eps), step_size=parse_eps(step_size) if step_size else None,
            attack_steps=attack_steps,
            epochs=(SCRATCH_EPOCHS if base is None else FINE_TUNE_EPOCHS) if epochs is None else epochs,
            batch_size=batch_size, lr=(SCRATCH_LR if base is None else FINE_TUNE_LR) if lr is None else lr,
            schedule=schedule, weight_decay=weight_decay,
            holdout=holdout, eval_images=eval_images, seed=seed, amp=amp, max_batches_per_epoch=max_batches,
        )  # fmt: skip
        started = time.perf_counter()
        torch_device = _setup_torch(device)
        if base is not None:
            model_cfg = get_model_config(base, registry or ())
            dataset = _load_data(data, input_hw=model_cfg.input_size[1:], classes=model_cfg.classes)
            arch_cfg = None
        else:
            dataset = _load_data(data, input_hw=(input_size, input_size) if input_size is not None else None)
            arch_cfg = model_cfg = arch_config(arch, classes=dataset.classes, arch_args=_arch_args(arch_arg or []),
                                               dataset=dataset_name or _guess_dataset(dataset.classes, data),
                                               input_size=(3, *dataset.images.shape[2:]), name=name or out.stem)  # fmt: skip
        if not no_register:
            _check_registration(name or out.stem, role, model_cfg, out)
        images = _training_images(dataset, holdout, f"{len(dataset.classes)} classes", *_per_epoch(config))
        c.note(f"training on {images} from {data}: {config.describe()}, {resolve_amp(torch_device, amp)} autocast, "
               f"on {torch_device}", shown=not quiet and not json_out)  # fmt: skip
        progress, callbacks = _reporter(json_out, quiet)
        with progress:
            written = _on_written(run, name=name or out.stem, register=not no_register, role=role,
                                  model_cfg=model_cfg, force=force)  # fmt: skip
            result = train(dataset, out, config=config, base=base, arch=arch_cfg, models_dir=models_dir,
                           registry=registry or (), device=torch_device, resume=resume, overwrite=replaceable,
                           on_written=written, **callbacks)  # fmt: skip
        _finish(result, name=name, register=not no_register, json_out=json_out, quiet=quiet, started=started,
                registry=registry, models_dir=models_dir)  # fmt: skip


def _guess_dataset(classes: tuple[str, ...], data: Path) -> str:
    """The built-in class set the data's classes match (e.g. cifar10), else the data's name."""
    from ..registry import builtin_class_sets

    for set_name, names in builtin_class_sets().items():
        if names == tuple(classes):
            return set_name
    return Path(data).stem


def _arch_args(items: list[str]) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--arch-arg expects KEY=VALUE, got {item!r}")
        args[key.strip()] = _arch_arg_value(key.strip(), value.strip())
    return args


def _arch_arg_value(key: str, text: str) -> Any:
    try:
        return arch_arg_value(text)
    except ValueError as e:  # no registry row could hold it: refused before training, not after
        raise ConfigError(f"--arch-arg {key}: {e}") from None


def keygen_cmd(
    out: OutOpt,
    base: Annotated[str, typer.Option("--base", metavar="NAME", help="The public robust model to derive your key from.")],
    data: Annotated[Path, typer.Option("--data", metavar="DATA", help="Training data (ImageFolder directory or zip).")],
    epochs: KeygenEpochsOpt = None,
    lr: KeygenLrOpt = None,
    max_batches: MaxBatchesOpt = None,
    holdout: HoldoutOpt = 1000,
    eval_images: EvalImagesOpt = 500,
    amp: AmpOpt = "auto",
    secret_seed: Annotated[
        Optional[int], typer.Option("--secret-seed", help="Use this seed instead of a fresh random one (tests, "
                                    "reproducible demos; a known seed makes a known key, on the same threads and "
                                    "precision). Typed here it is no secret: the process list shows it to every "
                                    "user of the machine while keygen runs, and your shell history keeps it.")
    ] = None,
    name: NameOpt = None,
    no_register: NoRegisterOpt = False,
    force: ForceOpt = False,
    device: c.DeviceOpt = "auto",
    models_dir: c.ModelsDirOpt = None,
    registry: c.RegistryOpt = None,
    json_out: TrainJsonOpt = False,
    quiet: c.QuietOpt = False,
    verbose: c.VerboseOpt = 0,
    log: c.LogOpt = None,
) -> None:
    """Derive your private backbone (key) from a public robust model by a short secret-seeded fine-tune."""
    c.setup_logging(verbose, quiet)
    with c.handle_errors(interrupted=KEYGEN_INTERRUPTED) as run:
        _check_no_register(no_register, {"--name": name})
        out = _check_output(out, force, False, checkpoints=False)
        if not no_register:  # a name that cannot be registered fails now, not after training
            _check_name(name, out, force)
        config = TrainConfig(**(asdict(KEYGEN_DEFAULTS) | {
            "epochs": KEYGEN_DEFAULTS.epochs if epochs is None else epochs,
            "lr": KEYGEN_DEFAULTS.lr if lr is None else lr, "amp": amp,
            "max_batches_per_epoch": max_batches, "holdout": holdout, "eval_images": eval_images}
            # a seed of yours is checked now, before the data is read (keygen sets it, see there)
            | ({"seed": secret_seed} if secret_seed is not None else {})))  # fmt: skip
        started = time.perf_counter()
        torch_device = _setup_torch(device)
        model_cfg = get_model_config(base, registry or ())
        dataset = _load_data(data, input_hw=model_cfg.input_size[1:], classes=model_cfg.classes)
        if dataset.training_size(holdout) < config.batch_size:  # keygen has no --batch-size to lower
            raise ConfigError(f"{data}: keygen trains in batches of {config.batch_size}, and "
                              f"{_training_images(dataset, holdout)} are fewer: give more data or lower --holdout")  # fmt: skip
        if not no_register:
            _check_registration(name or out.stem, "backbone", model_cfg, out)
        c.note(f"deriving a key from {base} on {_training_images(dataset, holdout, *_per_epoch(config))}: "
               f"{config.describe()}, {resolve_amp(torch_device, amp)} autocast, on {torch_device}",
               shown=not quiet and not json_out)  # fmt: skip
        progress, callbacks = _reporter(json_out, quiet)
        with progress:
            # without --overwrite, a key that another run wrote at --out meanwhile is not replaced (nor lost)
            written = _on_written(run, name=name or out.stem, register=not no_register, role="backbone",
                                  model_cfg=model_cfg, force=force)  # fmt: skip
            result = keygen(base, dataset, out, seed=secret_seed, config=config, models_dir=models_dir,
                            registry=registry or (), device=torch_device, overwrite=force, on_written=written,
                            **callbacks)  # fmt: skip
        _finish(result, name=name, register=not no_register, json_out=json_out, quiet=quiet, started=started,
                registry=registry, models_dir=models_dir)  # fmt: skip


__all__ = ["train_cmd", "keygen_cmd", "TRAIN_EPILOG", "KEYGEN_EPILOG", "user_registry_path"]
