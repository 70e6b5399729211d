"""What the README and docs/ say about the commands matches the commands.

The docs are read as text; the commands as code: which command can open a connection is found from the imports its
callback reaches (statically, nothing is run), and every ``--option`` written beside an ``edgemed COMMAND`` is looked
up among that command's click parameters.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
import textwrap
from pathlib import Path

import click

from edgemed.cli import cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: modules that open a connection or listen on one
NETWORK = ("requests", "urllib3", "httpx", "http.client", "urllib.request", "socket", "uvicorn")


def _commands(group: click.Group = cli, prefix: str = "") -> dict[str, click.Command]:
    """Every leaf command by its full name ("devices check")."""
    ctx = click.Context(group)
    found = {}
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if isinstance(cmd, click.Group):
            found.update(_commands(cmd, f"{prefix}{name} "))
        else:
            found[prefix + name] = cmd
    return found


def _imports(tree: ast.AST, package: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = (importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level
                    else node.module)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)  # a submodule imported by name


def _network_modules(roots) -> set[str]:
    """The network modules reached from ``roots`` through edgemed's own modules (imports at any depth of a module,
    function-level ones included: a command imports what it needs when it runs)."""
    seen, todo, hits = set(), list(roots), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if any(name == net or name.startswith(net + ".") for net in NETWORK):
            hits.add(name)
            continue
        if not name.startswith("edgemed."):
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None or not (spec.origin or "").endswith(".py"):
            continue
        package = name if spec.submodule_search_locations else name.rpartition(".")[0]
        todo.extend(_imports(ast.parse(Path(spec.origin).read_text(encoding="utf-8")), package))
    return hits


def network_commands() -> dict[str, set[str]]:
    """Each command whose callback reaches a network module, with the modules it reaches."""
    found = {}
    for name, cmd in _commands().items():
        callback = inspect.unwrap(cmd.callback)
        tree = ast.parse(textwrap.dedent(inspect.getsource(callback)))
        hits = _network_modules(_imports(tree, callback.__module__.rpartition(".")[0]))
        if hits:
            found[name] = hits
    return found


def _offline_sentence(path: Path) -> str:
    text = " ".join(path.read_text(encoding="utf-8").split())
    sentences = [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z`])", text) if "reaches the network" in s]
    assert len(sentences) == 1, f"{path.name}: expected one sentence saying which commands reach the network"
    return sentences[0]


def test_the_search_finds_the_commands_known_to_connect():
    found = network_commands()
    assert {"push", "pull", "login", "serve"} <= set(found), found  # the search itself works
    assert "requests" in found["pull"] and "socket" in found["serve"]


def test_the_offline_sentence_names_every_command_that_opens_a_connection():
    found = set(network_commands())
    commands = set(_commands())
    for path in (ROOT / "README.md", ROOT / "docs" / "architecture.md"):
        sentence = _offline_sentence(path)
        named = {code.removeprefix("edgemed ") for code in re.findall(r"`([^`]+)`", sentence)} & commands
        missing = found - named
        assert not missing, f"{path.name} says no command reaches the network but leaves out {sorted(missing)}"
