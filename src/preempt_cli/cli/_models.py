"""``preempt models``: list, show, verify and convert registered models."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer
from rich.table import Table

from ..convert import convert_checkpoint
from ..errors import ConfigError, PreemptError, UnknownModelError
from ..models import load_model
from ..registry import ROLES, ModelConfig, get_model_config, load_registry, registry_files, user_registry_path
from . import _common as c

app = typer.Typer(
    help="List, inspect, verify and convert the models of the registry (models.toml).",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


@app.callback()
def _models() -> None:
    # the logging of the other commands: a registry's warnings read "warning: FILE: ...", not a bare line
    c.setup_logging(0, False)


def _row(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "name": cfg.name,
        "role": cfg.role,
        "arch": cfg.arch,
        "arch_args": dict(cfg.arch_args),
        "dataset": cfg.dataset,
        "input_size": list(cfg.input_size),
        "mean": list(cfg.mean) if cfg.mean else None,
        "std": list(cfg.std) if cfg.std else None,
        "num_classes": cfg.num_classes,
        "classes": list(cfg.classes) if cfg.classes else None,
        "classes_from": cfg.classes_from,
        "source": str(cfg.source),
        "sha256": cfg.sha256,
        "paper_name": cfg.paper_name or None,
        "description": cfg.description,
        "notes": cfg.notes or None,
        "registry": str(cfg.registry_file) if cfg.registry_file else None,
    }


def _floats(values: tuple[float, ...] | None) -> str:
    return ",".join(f"{v:g}" for v in values) if values else "-"


#: ``models list`` columns: (header, value); the first ones always, the others with --verbose.
_COLUMNS: list[tuple[str, Any]] = [
    ("name", lambda m: m.name),
    ("role", lambda m: m.role),
    ("arch", lambda m: m.arch),
    ("dataset", lambda m: m.dataset),
    ("input", lambda m: "x".join(map(str, m.input_size))),
    ("source", lambda m: str(m.source)),
]
_VERBOSE_COLUMNS: list[tuple[str, Any]] = [
    ("classes", lambda m: str(m.num_classes)),
    ("mean", lambda m: _floats(m.mean)),
    ("std", lambda m: _floats(m.std)),
    ("revision", lambda m: m.source.revision or "-"),
    ("sha256", lambda m: m.sha256[:12] if m.sha256 else "-"),
    ("registry", lambda m: str(m.registry_file) if m.registry_file else "-"),
]


@app.command("list", epilog="[bold]Examples[/]\n\n  preempt models list\n\n  preempt models list --role backbone --json"
             "\n\n  preempt models list --verbose")
def list_cmd(
    role: Annotated[Optional[str], typer.Option("--role", help="Only backbone, classifier or victim models (with the rows of role any, which serve as all three).")] = None,
    registry: c.RegistryOpt = None,
    json_out: c.JsonOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More columns: classes, mean/std, revision, "
                                          "sha256 pin, registry file.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="The table alone: on stderr only errors (no "
                                        "registry files or warnings).")] = False,
    log: c.LogOpt = None,
) -> None:
    """List registered models."""
    c.setup_logging(0, quiet)
    with c.handle_errors():
        if role is not None and role not in ROLES:
            raise ConfigError(f"unknown --role {role!r}: use {', '.join(ROLES[:-1])} or {ROLES[-1]}")
        models = load_registry(registry or ())
        rows = [m for m in sorted(models.values(), key=lambda m: m.name) if role is None or m.role in (role, "any")]
        if json_out:
            for m in rows:
                c.print_json(_row(m))
            return
        columns = _COLUMNS + (_VERBOSE_COLUMNS if verbose else [])
        table = Table(title=None, show_edge=False, header_style="bold")
        for header, _ in columns:  # names whole, on one line; others fold on a narrow terminal
            table.add_column(header, no_wrap=header == "name", overflow="fold")
        for m in rows:
            table.add_row(*(c.table_cell(value(m)) for _, value in columns))
        c.print_table(table)
        files = ", ".join(str(p) for p in registry_files(registry or ()))
        c.note(f"registries: {files} (user registry: {user_registry_path()})", shown=not quiet)


@app.command("show", epilog="[bold]Examples[/]\n\n  preempt models show cifar10-resnet20-pgdat-a")
def show_cmd(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Registered model name.")],
    registry: c.RegistryOpt = None,
    json_out: c.JsonOpt = False,
    log: c.LogOpt = None,
) -> None:
    """Show one model's registry entry."""
    with c.handle_errors():
        row = _row(get_model_config(name, registry or ()))
        if json_out:
            c.print_json(row)
            return
        for key, value in row.items():
            if key == "classes_from":  # said by the classes line
                continue
            if key == "classes" and row["classes_from"] == "timm":  # ImageNet's 1000: where they are, not all
                value = (f"{row['num_classes']} of {row['dataset']}, from timm (timm.data.ImageNetInfo): labels by "
                         "synset (n01440764), name, synonym (tench) or index")  # fmt: skip
            if value not in (None, "", [], {}):
                c.print_result(f"{key:12} {value}")


@app.command(
    "verify",
    epilog="[bold]Examples[/]\n\n  preempt models verify cifar10-resnet20-pgdat-a --models-dir ../shared/models",
)
def verify_cmd(
    names: Annotated[list[str], typer.Argument(metavar="NAME...", help="Registered model names.")],
    models_dir: c.ModelsDirOpt = None,
    registry: c.RegistryOpt = None,
    device: c.DeviceOpt = "cpu",
    json_out: c.JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Failures only: no line for a model that passes "
                                        "(the exit code says whether all did).")] = False,
    verbose: c.VerboseOpt = 0,
    log: c.LogOpt = None,
) -> None:
    """Check a model: find its weights, verify the sha256 pin, load them, run one forward pass."""
    c.setup_logging(verbose, quiet)
    failed = 0
    with c.handle_errors():
        torch_device = c.one_device(device)
        # a registry that cannot be read is a setup error, reported once (exit 2), not a failure of each model
        models = load_registry(registry or ())
        for name in names:  # each model is reported on its own; one broken row does not stop the others
            start = time.perf_counter()
            try:
                if name not in models:
                    raise UnknownModelError(name, sorted(models))
                cfg = models[name]
                model = load_model(cfg, device=torch_device, models_dir=models_dir)
                with torch.inference_mode():
                    logits = model(torch.rand(2, *cfg.input_size, generator=torch.Generator().manual_seed(0)).to(torch_device))
                if logits.shape != (2, cfg.num_classes) or not torch.isfinite(logits).all():
                    raise PreemptError(f"forward pass gave {tuple(logits.shape)} / non-finite logits")
                # claim a pin match only where load_model checked it on the bytes it loaded
                row = {"name": name, "ok": True, "weights": model.weights_path, "sha256": model.weights_sha256,
                       "pinned": model.pin_verified, "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip
                if json_out:
                    c.print_json(row)
                elif not quiet:
                    if model.pin_verified:
                        pin = "sha256 matches pin"
                    elif cfg.source.kind == "timm":
                        pin = "timm's own weights, no sha256 check"
                    else:
                        pin = "no sha256 pin"
                    c.print_result(f"ok  {name}: {model.weights_path} ({pin}; forward {tuple(logits.shape)})")
            except Exception as e:
                if not isinstance(e, PreemptError) and c.debug_enabled():
                    raise
                failed += 1
                message = str(e) if isinstance(e, PreemptError) else f"internal error: {type(e).__name__}: {e}"
                if json_out:
                    c.print_json({"name": name, "ok": False, "error": message})
                c.error_line(message, head=name)
    raise typer.Exit(c.EXIT_FAILURES if failed else c.EXIT_OK)


@app.command(
    "convert",
    epilog="[bold]Examples[/]\n\n  preempt models convert Gowal2021Improving_R18_ddpm_100m.pt "
    "models/Gowal2021Improving_R18_ddpm_100m.safetensors\n\n"
    # a model's weights are found by the file name of its registry row, not by the model's name
    "Name the output as the model's registry row names its file (see 'preempt models show preact18'), and pass "
    "its folder as --models-dir (or PREEMPT_MODELS_DIR).",
)
def convert_cmd(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="A PyTorch checkpoint (.pt/.pth).")],
    # a string: Path() would drop the trailing slash of a folder meant ("new/"), which convert refuses
    output: Annotated[str, typer.Argument(metavar="OUTPUT", help="The safetensors file to write.")],
    key: Annotated[
        Optional[str], typer.Option("--key", help="Entry holding the state dict (default: state_dict/model/…); a "
                                    "nested one by its dotted path (a.b for {a: {b: ...}}), an entry named "
                                    "with dots itself (model.ema) matched first.")
    ] = None,
    strip_prefix: Annotated[
        list[str], typer.Option("--strip-prefix", metavar="PREFIX", help="Prefix to remove from keys; repeatable (those given replace "
                                "the default).")
    ] = ["module."],  # noqa: B006 - typer reads the default
    force: Annotated[bool, typer.Option("--overwrite", "--force", help="Replace an existing output (never the "
                                        "checkpoint); --force: its former name.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="The output's path only, for scripts; no "
                                        "warnings.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object: checkpoint, output, tensors, "
                                           "sha256 (for a registry row's pin).")] = False,
    verbose: c.VerboseOpt = 0,
    log: c.LogOpt = None,
) -> None:
    """Convert a PyTorch checkpoint to safetensors, loading it with torch.load(weights_only=True)."""
    c.setup_logging(verbose, quiet)
    with c.handle_errors():
        n, sha = convert_checkpoint(checkpoint, output, key=key, strip_prefixes=tuple(strip_prefix), overwrite=force)
        written = Path(output)
        if json_out:  # the pin a registry row takes, without reading it back out of the human line
            c.print_json({"checkpoint": str(checkpoint), "output": str(written), "tensors": n, "sha256": sha})
        elif quiet:  # the path alone, for scripts: as protect lists its outputs
            c.print_line(c.shown_path(written))
        else:
            c.print_result(f"{written} ({n} tensors, sha256 {sha})")
