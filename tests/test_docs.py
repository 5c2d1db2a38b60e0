"""The documentation against the code, so that an example never names what the code lacks.

Every ``preempt ...`` command that README.md, benchmarks/README.md and benchmarks/RESULTS.md give (in code
blocks and inline code) and every command's ``--help`` examples name only options of that command; every
option README.md names anywhere is one of some command; README's Python examples compile and import only
names that exist, and read only names they define; eval's spec synopses name only keys eval takes; the
examples name only registered models; the benchmark commands the docs give name only their script's options;
``--json``'s keys are the ones README lists. Nothing here runs a model: the examples themselves were run by hand
(see the CHANGELOG), these keep their names from drifting.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the backport the registry reads with too
    import tomli as tomllib

from preempt_cli.cli import app
from preempt_cli.protect import FileResult

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "benchmarks/README.md", "benchmarks/RESULTS.md")
#: options README names that belong to other tools (pip's --upgrade, docker run's --cpus)
OTHER_TOOLS_OPTIONS = {"--upgrade", "--cpus"}
ROOT_COMMAND = typer.main.get_command(app)


def _read(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def _fenced(text: str, languages: tuple[str, ...]) -> list[str]:
    """The code blocks of ``text`` in one of ``languages`` ("" for a block without one)."""
    return [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M) if lang in languages]


def _preempt_commands(text: str) -> list[str]:
    """The ``preempt ...`` command lines of a Markdown text: in shell blocks (continued lines joined, comments
    cut, pipelines split) and in inline code."""
    commands = []
    for block in _fenced(text, ("", "bash", "sh", "console")):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s#.*", "", line)
            commands += [c.strip() for c in re.split(r"\s\|\s|&&|;", line) if c.strip().startswith("preempt ")]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M).replace("\\\n", " ")
    for span in re.findall(r"`([^`]+)`", prose):
        span = " ".join(span.split())
        if span.startswith("preempt ") and span.split()[1] in ROOT_COMMAND.commands:
            commands.append(span)
    return commands


def _options(command: object) -> set[str]:
    params = command.params  # type: ignore[attr-defined]
    return {o for p in params for o in (*p.opts, *getattr(p, "secondary_opts", ()))}


def _unknown_options(line: str) -> tuple[str, list[str]]:
    """The command a ``preempt ...`` line runs, and the options it names that the command lacks. Synopses are
    taken too: ``[--eps 8/255]``, ``(--white-box | --backbone NAME)``, ``-v/--verbose``."""
    words = shlex.split(line.replace("'", " ").replace('"', " "))[1:]
    command, path = ROOT_COMMAND, ["preempt"]
    while hasattr(command, "commands") and words and words[0] in command.commands:  # typer 0.29 vendors click
        path.append(words[0])
        command = command.commands[words.pop(0)]
    known = _options(command) | {"-h", "--help"}
    unknown = []
    for word in words:
        for token in re.split(r"[/|]", word.strip("()[],")):
            token = token.split("=")[0]
            if not token.startswith("-") or token == "-" or re.fullmatch(r"-\d.*", token):
                continue  # an argument, stdin, a negative number
            if re.fullmatch(r"-[a-zA-Z]{2,}", token):  # -vv, -q0: a cluster of short options
                unknown += [token] if any(f"-{c}" not in known for c in token[1:]) else []
            elif token not in known:
                unknown.append(token)
    return " ".join(path), unknown


@pytest.mark.parametrize("doc", DOCS)
def test_documented_commands_name_only_options_they_have(doc: str) -> None:
    commands = _preempt_commands(_read(doc))
    if doc == "README.md":
        assert len(commands) >= 20  # the extraction finds the Quick start's and the reference's commands
    bad = [(line, *_unknown_options(line)) for line in commands]
    assert [b for b in bad if b[2]] == []


def _help_examples(command: list[str]) -> list[str]:
    """The ``preempt ...`` commands of a command's help examples: each paragraph starting with ``preempt`` or
    ``find`` joined into one line, its parenthesized note cut, its pipeline split."""
    text = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "400"}).stdout
    lines = [line.strip() for line in text.split("Examples", 1)[1].splitlines()]
    paragraphs = " ".join(line or "\n" for line in lines).split("\n")  # blank lines end a paragraph
    examples = (" ".join(p.replace(" \\ ", " ").split()).split(" (")[0] for p in paragraphs)
    return [c for e in examples if e.startswith(("preempt ", "find ")) for c in re.split(r"\s\|\s", e)
            if c.startswith("preempt ")]  # fmt: skip


@pytest.mark.parametrize("command", [[], ["protect"], ["revert"], ["eval"], ["train"], ["keygen"], ["models", "list"],
                                     ["models", "show"], ["models", "verify"], ["models", "convert"]])  # fmt: skip
def test_help_examples_name_only_options_they_have(command: list[str]) -> None:
    examples = _help_examples(command)
    assert examples, command
    assert [(e, _unknown_options(e)[1]) for e in examples if _unknown_options(e)[1]] == []


def _all_options() -> set[str]:
    found: set[str] = set()

    def walk(command: object) -> None:
        found.update(_options(command))
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(ROOT_COMMAND)
    return found


def test_every_option_the_readme_names_exists() -> None:
    """The option tables and the prose name options outside any ``preempt ...`` line (``--fsync/--no-fsync``,
    ``--reversion-classifier NAME``): each is an option of some command."""
    text = _read("README.md")
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    code = [*re.findall(r"`([^`]+)`", prose), *_fenced(text, ("", "bash", "sh"))]
    named = set(re.findall(r"(?<![\w.-])(--[a-z][a-z0-9-]*)", "\n".join(code)))
    assert len(named) > 40
    assert sorted(named - _all_options() - OTHER_TOOLS_OPTIONS) == []


def _imported_names(source: str) -> list[tuple[str, str]]:
    tree = ast.parse(source)
    return [(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and node.module and node.module.startswith("preempt_cli") for alias in node.names]  # fmt: skip


def test_readme_python_examples_compile_and_import_what_exists() -> None:
    blocks = _fenced(_read("README.md"), ("python",))
    assert blocks
    imports = []
    for block in blocks:
        compile(block, "README.md", "exec")
        imports += _imported_names(block)
    # the package's own docstring gives the imports of the API too
    docstring = importlib.import_module("preempt_cli").__doc__
    imports += _imported_names("\n".join(line.strip() for line in docstring.splitlines()
                                        if line.strip().startswith("from preempt_cli")))
    assert len(imports) > 15
    missing = [f"{m}.{n}" for m, n in imports if not hasattr(importlib.import_module(m), n)]
    assert missing == []


def test_readme_example_of_a_net_of_your_own_runs() -> None:
    """Wrapping a user's ``nn.Module`` was said only in an error message ("ImageModel(net, ModelConfig(...))"),
    whose ``ModelConfig`` needs a ``source``, a ``Source`` that nothing exported: README shows it whole."""
    [block] = [b for b in _fenced(_read("README.md"), ("python",)) if "ImageModel(net, config)" in b]
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    protected = namespace["x_protected"]
    assert protected.shape == (2, 3, 48, 40) and 0 <= float(protected.min()) <= float(protected.max()) <= 1


_SCRIPTS = ("bench_protect", "bench_pipeline", "bench_eval", "bench_keys", "trace_e2e")


def test_documented_benchmark_commands_name_only_their_options() -> None:
    defined = {s: set(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", _read(f"benchmarks/{s}.py"))) | {"--help"}
               for s in _SCRIPTS}  # fmt: skip
    assert all(len(options) > 3 for options in defined.values()), defined
    docs = [*DOCS, *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "benchmarks").glob("*.sh")))]
    bad, seen = [], 0
    for doc in docs:
        text = _read(doc).replace("\\\n", " ")
        for script, args in re.findall(rf"({'|'.join(_SCRIPTS)})\.py([^\n`|>#]*)", text):
            seen += 1
            named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", args))
            bad += [(doc, script, option) for option in sorted(named - defined[script])]
    assert seen > 20
    assert bad == []


def test_readme_lists_every_json_key_of_a_result() -> None:
    text = " ".join(_read("README.md").split())
    paragraph = text[text.index("JSON lines with `--json`") :][:700]
    keys = [f.name for f in dataclasses.fields(FileResult)]
    assert [k for k in keys if f"`{k}`" not in paragraph] == []


def test_documented_bench_protect_smoke_test_limits_every_image_count() -> None:
    """The smoke test the docs give ran the bf16 accuracy check on all 932 images where bf16 is native (over
    5 minutes on 2 cores, "a minute or two" said the docs): each option counting images is set."""
    counts = set(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]*images)\"", _read("benchmarks/bench_protect.py")))
    assert {"--images", "--accuracy-images", "--e2e-images"} <= counts
    smoke = []
    for doc in ("benchmarks/README.md", "benchmarks/bench_protect.py"):
        text = _read(doc).replace("\\\n", " ")
        smoke += [line for line in text.splitlines() if "bench_protect.py --images 8" in line]
    assert len(smoke) == 2
    for line in smoke:
        named = set(re.findall(r"--[a-z0-9-]*images", line))
        # --e2e-images defaults to --images; the reference and Bi-Level parts take their own
        assert counts - {"--e2e-images"} <= named, line


def _help_texts() -> list[tuple[str, str]]:
    """(command, text) of every command's help and epilog and every option's and argument's help."""
    found: list[tuple[str, str]] = []

    def walk(command: object, path: str) -> None:
        texts = (getattr(command, "help", None), getattr(command, "epilog", None))
        found.extend((path, text) for text in texts if text)
        found.extend((f"{path} {param.opts[0]}", param.help) for param in command.params  # type: ignore[attr-defined]
                     if getattr(param, "help", None))  # fmt: skip
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(ROOT_COMMAND, "preempt")
    return found


def test_help_texts_hold_no_markdown_code() -> None:
    """eval's --reversion-labels said "as `preempt revert`": the help is not Markdown, and showed the backticks
    as they are. The help quotes a command as the others do ('preempt models list')."""
    texts = _help_texts()
    assert len(texts) > 100
    assert [(where, text) for where, text in texts if "`" in text] == []


def test_benchmarks_readme_names_every_folder_of_raw_results() -> None:
    """benchmarks/README.md listed the raw outputs' folders as `cpu-epyc/`, `gpu-h100/`, `gpu-h200/` after the
    runs of 0.14.0 to 0.24.0 went into `cpu-xeon/`: a reader looking for the latest CPU runs was sent elsewhere."""
    text = _read("benchmarks/README.md")
    [listing] = re.findall(r"raw outputs in `results/` \(([^)]*)\)", text)
    committed = {p.name for p in (ROOT / "benchmarks" / "results").iterdir()
                 if p.is_dir() and p.name not in ("cache", "models")}  # (cache, models: a run's own, not committed)
    assert len(committed) >= 4
    assert sorted(committed - set(re.findall(r"`([\w.-]+)/`", listing))) == []


def test_changelog_follows_keep_a_changelog() -> None:
    """0.5.0 to 0.19.0 had sections in the order they were written (`Fixed` before `Added` in 0.5.0, `Removed`
    after `Fixed` in 0.9.0): Keep a Changelog's order is Added, Changed, Deprecated, Removed, Fixed, Security.
    [Unreleased] comes first, then each version newest first with its date, none twice."""
    order = ["Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"]
    headings = re.findall(r"^(##|###) (.*)$", _read("CHANGELOG.md"), re.M)
    versions: list[tuple[str, list[str]]] = []
    for level, title in headings:
        if level == "##":
            versions.append((title, []))
        else:
            versions[-1][1].append(title)
    assert versions[0][0] == "[Unreleased]"
    released = [re.fullmatch(r"\[(\d+)\.(\d+)\.(\d+)\] - (\d{4}-\d\d-\d\d)", title) for title, _ in versions[1:]]
    assert None not in released, [t for (t, _), m in zip(versions[1:], released) if m is None]
    numbers = [tuple(int(n) for n in m.groups()[:3]) for m in released if m]
    dates = [m.group(4) for m in released if m]
    assert numbers == sorted(set(numbers), reverse=True) and dates == sorted(dates, reverse=True)
    # the latest release is the version the package and pyproject.toml say
    [project_version] = re.findall(r'^version = "([^"]+)"', _read("pyproject.toml"), re.M)
    assert ".".join(map(str, numbers[0])) == project_version == importlib.import_module("preempt_cli").__version__
    # the standard kinds of change, each once and in order; a version's own notes (0.14.0's "Measured") after them
    bad = []
    for title, sections in versions:
        kinds = [s for s in sections if s in order]
        if kinds != sorted(set(kinds), key=order.index) or sections[: len(kinds)] != kinds:
            bad.append((title, sections))
    assert bad == []


def test_benchmarks_readme_names_every_step_and_knob_of_gpu_check() -> None:
    """benchmarks/README.md said gpu_check.sh runs the tests, bench_protect.py and bench_pipeline.py, and named
    its knobs without TRACE_ARGS and TRACE_TIMEOUT: its fourth step, trace_e2e.py, was not said, though its
    240 s are in the 900 s the section adds up."""
    text = _read("benchmarks/README.md")
    section = text[text.index("## `gpu_check.sh`") :]
    section = section[: section.index("\n## ", 1)]
    script = _read("benchmarks/gpu_check.sh") + _read("benchmarks/gpu_env.sh")
    knobs = set(re.findall(r"\$\{([A-Z_]+):-", script))
    scripts = set(re.findall(r"benchmarks/(\w+\.py)", script))
    assert {"TRACE_TIMEOUT", "PACK"} <= knobs and {"bench_protect.py", "trace_e2e.py"} <= scripts
    assert sorted(k for k in knobs if f"`{k}`" not in section) == []
    assert sorted(s for s in scripts if s not in section) == []


def _spec_synopses(text: str) -> dict[str, set[str]]:
    """The keys README's synopses of eval's specs give, ``fp[:backbone=,classifier=,...]``: kind -> keys."""
    flat = " ".join(text.split())
    found: dict[str, set[str]] = {}
    for kind, body in re.findall(r"`(fp|bilevel|pgd|aa)\[:([^`\]]*)\]", flat):
        found.setdefault(kind, set()).update(re.findall(r"(?:^|,)\s*([a-z_]+)=", body))
    return found


def test_readme_spec_synopses_name_the_keys_eval_takes() -> None:
    """README gives eval's defenses and attacks as synopses (``pgd[:norm=Linf|L2,eps=,steps=20,...]``): each key
    they name is one the spec parser takes (an unknown one is refused: "does not take"), and, for the defenses,
    every key the parser takes is named."""
    from preempt_cli.evaluate import _DEFENSE_OPTIONS, AttackSpec, ConfigError

    synopses = _spec_synopses(_read("README.md"))
    assert set(synopses) == {"fp", "bilevel", "pgd", "aa"}
    assert synopses["fp"] == _DEFENSE_OPTIONS["fast-preemption"]
    assert synopses["bilevel"] == _DEFENSE_OPTIONS["bi-level"]
    refused = []
    for kind in ("pgd", "aa"):
        assert len(synopses[kind]) >= 4, synopses[kind]
        for key in sorted(synopses[kind]):
            try:
                AttackSpec.parse(f"{kind}:{key}=x")
            except ConfigError as error:  # a bad value is refused too: only "does not take" says the key is unknown
                refused += [(kind, key)] if "does not take" in str(error) else []
    assert refused == []


def _documented_model_names(text: str) -> set[str]:
    """The model names README's commands and Python give: ``-b``, ``--victim`` and the like, ``load_model("...")``."""
    flat = text.replace("\\\n", " ")
    options = r"-b|-c|--backbone|--classifier|--victim|--base|--reversion-backbone|--reversion-classifier"
    names = set(re.findall(rf"(?<![\w-])(?:{options})[ =]([a-z][\w.-]*)", flat))
    names |= set(re.findall(r"load_model\(\"([^\"]+)\"", flat))
    names |= set(re.findall(r"models (?:show|verify) ([a-z][\w.-]*)", flat))
    return names


def test_readme_names_only_registered_models() -> None:
    """A model README's examples name (``--victim cifar10-resnet20-pgdat-b``) is a row of the built-in registry;
    the user's own key is the one name the examples make first (``keygen --out .../my-key.safetensors``)."""
    from preempt_cli.registry import builtin_registry_path

    registered = set(tomllib.loads(builtin_registry_path().read_text(encoding="utf-8"))["models"])
    names = _documented_model_names(_read("README.md"))
    assert {"preempt-resnet20-at", "cifar10-resnet20-pgdat-b"} <= names
    assert sorted(names - registered - {"my-key"}) == []


def test_readme_python_examples_use_only_names_they_define() -> None:
    """The API example protected ``x``, which it never made: pasted as it stands it stopped at a NameError. Each
    block is read as a script: every name it reads is imported, assigned or bound in it first, or a builtin."""
    import builtins

    undefined = []
    for block in _fenced(_read("README.md"), ("python",)):
        tree = ast.parse(block)
        bound = set(dir(builtins))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                bound.add(node.id)
            elif isinstance(node, ast.arg):
                bound.add(node.arg)
        undefined += sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
                             and n.id not in bound})  # fmt: skip
    assert undefined == []


def test_readme_says_where_eval_writes_by_default() -> None:
    """README's eval example gives no --out, and README did not say that eval writes its report, results and resume
    state into a folder of the working directory all the same: it names the default, which is the CLI's."""
    [out] = [p for p in ROOT_COMMAND.commands["eval"].params if "--out" in p.opts]  # type: ignore[attr-defined]
    text = " ".join(_read("README.md").split())
    assert f"`--out DIR` (default `{out.default}`" in text
