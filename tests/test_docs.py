"""What the README and the experiment logs show a user still runs as written.

Every complete ``diffalign`` command in them (one with ``--out``, not a usage template) must parse,
its ``--set`` overrides must build the config they name, and every Python example must import
what it imports and call the library with arguments its signatures accept. Nothing is executed
beyond argument parsing and config validation.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import shlex
from pathlib import Path

import pytest

from diffalign.cli import build_parser
from diffalign.commands.train import _methods, recipe_path
from diffalign.world.clip import WorldClipConfig
from diffalign.world.pretrain import WorldPretrainConfig

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
# placeholders the docs use for values a reader picks, and a valid value for each
PLACEHOLDERS = {"S": "0", "K": "2", "F": "0.5", "N": "4", "B": "4", "LR": "1e-3",
                "SPLIT": "validation"}  # fmt: skip
TEMPLATE = re.compile(r"\[--|\||\.\.\.")


def documented_commands(text: str) -> list[str]:
    """The arguments after ``diffalign`` of each command in code blocks and inline code."""
    commands = []
    for match in FENCE.finditer(text):
        if match.group(1) == "python":
            continue
        for line in match.group(2).replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if "$(which diffalign)" in line:
                commands.append(line.split("$(which diffalign)", 1)[1].strip())
            elif line.startswith("diffalign "):
                commands.append(line.removeprefix("diffalign "))
    prose = FENCE.sub("", text)
    commands += [span.replace("\n", " ") for span in re.findall(r"`diffalign ([^`]+)`", prose)]
    return [command for command in commands if "--out" in command and not TEMPLATE.search(command)]


def _fill_placeholders(tokens: list[str]) -> list[str]:
    def fill(token: str) -> str:
        key, sep, value = token.partition("=")
        if sep and value in PLACEHOLDERS:
            return f"{key}={PLACEHOLDERS[value]}"
        return PLACEHOLDERS.get(token, token)

    return [fill(token) for token in tokens]


def _check_config(args) -> None:
    """Build the config a train or world-training command would run with (raises ConfigError)."""
    if args.command == "train" and args.recipe not in (None, "list"):
        shipped_or_file = Path(args.recipe).suffix not in (".yaml", ".yml")
        if shipped_or_file or Path(args.recipe).is_file():
            config_cls = _methods()[args.method][0]
            config_cls.from_yaml(recipe_path(args.method, args.recipe), args.set)
    elif args.command == "world" and args.world_command in ("pretrain", "pretrain-clip"):
        config_cls = WorldPretrainConfig if args.world_command == "pretrain" else WorldClipConfig
        config_cls.from_dict({}, args.set)


def command_problems(text: str, capsys) -> list[str]:
    """Each documented command that does not parse or whose config does not build, and why."""
    parser = build_parser()
    problems = []
    for command in documented_commands(text):
        try:
            args = parser.parse_args(_fill_placeholders(shlex.split(command)))
        except SystemExit:
            error = capsys.readouterr().err.strip().splitlines()[-1:]
            problems.append(f"diffalign {command}\n    -> {' '.join(error)}")
            continue
        try:
            _check_config(args)
        except Exception as error:  # any failure to build the config is what we report
            problems.append(f"diffalign {command}\n    -> {error}")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_documented_commands_parse_and_their_settings_exist(doc, capsys):
    assert documented_commands(doc.read_text()), f"no commands found in {doc.name}"
    problems = command_problems(doc.read_text(), capsys)
    assert not problems, f"{doc.name} shows commands that fail:\n" + "\n".join(problems)


def _imported_names(tree: ast.Module) -> dict[str, object]:
    names: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                value = getattr(module, alias.name, None)
                if value is None:  # a submodule: from diffalign import models
                    value = importlib.import_module(f"{node.module}.{alias.name}")
                names[alias.asname or alias.name] = value
        elif isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name] = importlib.import_module(alias.name)
    return names


def _called_object(func: ast.expr, names: dict[str, object]) -> object | None:
    """What ``name(...)`` or ``name.attribute(...)`` calls, for names the snippet imported."""
    if isinstance(func, ast.Name):
        return names.get(func.id)
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        owner = names.get(func.value.id)
        if owner is not None:
            return getattr(owner, func.attr)  # AttributeError: the doc names what is not there
    return None


def snippet_problems(code: str) -> list[str]:
    """Calls in a Python example whose arguments the called object's signature rejects."""
    tree = ast.parse(code)
    names = _imported_names(tree)
    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        target = _called_object(node.func, names)
        if target is None or not callable(target):
            continue
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):  # builtins without a signature
            continue
        keywords = {keyword.arg: None for keyword in node.keywords if keyword.arg}
        try:
            signature.bind(*[None] * len(node.args), **keywords)
        except TypeError as error:
            problems.append(f"{ast.unparse(node)[:120]}\n    -> {error}")
    return problems


def python_snippets() -> list[tuple[str, str]]:
    text = (REPO / "README.md").read_text()
    blocks = [m.group(2) for m in FENCE.finditer(text) if m.group(1) == "python"]
    return [(f"README-python-{i}", block) for i, block in enumerate(blocks, 1)]


@pytest.mark.parametrize("name, code", python_snippets(), ids=[n for n, _ in python_snippets()])
def test_python_examples_import_and_call_what_exists(name, code):
    assert not snippet_problems(code), "\n".join(snippet_problems(code))


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a document's headings (code blocks aside): lower case, punctuation
    dropped, spaces as hyphens, a repeated heading numbered from -1."""
    anchors, seen = set(), {}
    for title in re.findall(r"^#{1,6} +(.+?) *$", FENCE.sub("", markdown), re.M):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def link_problems(path: Path) -> list[str]:
    """The local links of the Markdown file at ``path`` (images too) whose file is missing, or
    whose ``#anchor`` names no heading of the file it points into."""
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", path.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = path.parent / file if file else path
        if not linked.exists():
            problems.append(f"{path.name}: {target}: no such file")
        elif anchor and anchor not in heading_anchors(linked.read_text()):
            problems.append(f"{path.name}: {target}: no such heading")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_local_links_and_anchors_resolve(doc):
    assert not link_problems(doc), "\n".join(link_problems(doc))


def test_the_link_check_catches_a_missing_heading_and_file(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Set-up: two `commands`\n```bash\n# not a heading\n```\n## Set-up: two "
                   "commands\n[a](#set-up-two-commands-1) [b](#not-a-heading) [c](gone.md) "
                   "[d](doc.md#set-up-two-commands) [e](https://example.com/x)\n")  # fmt: skip
    assert link_problems(doc) == ["doc.md: #not-a-heading: no such heading",
                                  "doc.md: gone.md: no such file"]  # fmt: skip


def test_the_checks_catch_a_stale_flag_a_missing_setting_and_a_wrong_keyword(capsys):
    stale = "`diffalign bench dts --model assets/tiny-shapes --no-such-flag --out DIR`"
    misspelt = "```bash\ndiffalign train awm --recipe tiny-shapes --set learning_rat=1 --out D\n```"
    world = "`diffalign world pretrain --out DIR --set unet_step=10`"
    problems = command_problems("\n".join([stale, misspelt, world]), capsys)
    assert len(problems) == 3
    for culprit in ("--no-such-flag", "'learning_rat'", "'unet_step'"):
        assert sum(culprit in problem for problem in problems) == 1, culprit
    wrong = (
        "from diffalign.checkpoint import save_checkpoint\nsave_checkpoint('d', 1, {}, keep=3)\n"
    )
    assert "'keep'" in snippet_problems(wrong)[0]
    with pytest.raises(AttributeError):
        snippet_problems("from diffalign import models\nmodels.no_such_function(1)\n")
    template = "`diffalign eval --model M [--baseline M0] --out DIR`"
    assert documented_commands(template) == []
