"""README.md is run: every code block and every command in it, so the docs cannot drift.

How each fenced block is run:

- ```` ```python ```` / ```` ```toml ```` whose first line is ``# name.py`` (or ``# name.toml``):
  a file. It is written into a fresh directory (with a copy of ``examples/``) where the
  shell blocks run and from which the Python blocks import (``from app import say``).
- other ```` ```python ```` blocks: complete snippets that define ``main()``. Each is run
  in-process against a real server (``trioworker_server``) with a real worker serving the
  tasks the snippet defines or imports, unless the snippet runs workers of its own.
- ```` ```bash ````: a shell session, run in that directory with ``TRIOWORKER_API_URL``
  pointing at a real server. A line commented ``until Ctrl-C`` is long-running: it is
  started in the background, waited for until it is ready, and stopped with SIGINT at the
  end of the block (it must exit with code 0). Other lines run in bash, in order, and must
  exit with 0; a comment ``prints: TEXT`` means their output must contain TEXT. The
  commands that install packages or run this very test suite (``pip install``, ``nox``,
  ``python -m pytest``) are not run but checked (the extras, sessions and CI script exist).
- ```` ```text ```` starting with ``trioworker``: the command-line synopsis, compared with the
  real parser (every command, every option, every default shown).
- A block after ``<!-- readme-test: skip reason="..." -->`` is not run (pure reference);
  every skip needs a reason, and there may be at most two.

The port numbers the README uses (4300, 4301, 5000) are replaced: where a command binds one,
by 0 (the server, the status server and hypercorn pick a free port and print it); where a
command connects to one, by the port that was printed. The PostgreSQL database it names
(:data:`README_POSTGRES`) is replaced by a fresh one of the test's own (``postgres_url``).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
import types
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

import trioworker
from trioworker.cli import build_parser
from trioworker.models import StateType
from trioworker.server import RunningServer
from trioworker.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: Real seconds one step (a command, a readiness wait, a snippet) may take.
STEP_SECONDS = 60
#: Blocks that may be skipped, at most.
MAX_SKIPS = 2
#: Ports the README names, replaced by free ones when its commands run.
README_PORTS = ("4300", "4301", "5000")
QUICKSTART = ["pip install . && trioworker demo", "pip install -e '.[test]' && python -m pytest"]
#: The PostgreSQL database the README names.
README_POSTGRES = "postgresql://postgres@127.0.0.1:5432/trioworker"

Make = Callable[..., trioworker.TaskWorker]


# --------------------------------------------------------------------------- parsing the README


@attrs.frozen
class Block:
    lang: str
    code: str
    #: The line of the opening fence (1-based).
    line: int
    section: str
    skip: str | None = None

    @property
    def filename(self) -> str | None:
        """``app.py`` for a block whose first line is ``# app.py``."""
        match = re.fullmatch(r"# (\S+\.(?:py|toml))", self.code.split("\n", 1)[0])
        return match[1] if match else None

    @property
    def id(self) -> str:
        return f"L{self.line}-{re.sub(r'[^a-z0-9]+', '-', self.section.lower()).strip('-')}"


SKIP_MARKER = re.compile(r'<!-- readme-test: skip reason="(?P<reason>[^"]+)" -->')


def parse_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    section, i = "", 0
    while i < len(lines):
        line = lines[i]
        fence = re.fullmatch(r"```(\S*)\s*", line)
        if fence is None:
            if line.startswith("#"):
                section = line.lstrip("#").strip()
            if "readme-test" in line:
                assert SKIP_MARKER.fullmatch(line.strip()), f"README.md:{i + 1}: malformed marker {line!r}"
            i += 1
            continue
        start = i
        i += 1
        body: list[str] = []
        while not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        previous = next((p for p in reversed(lines[:start]) if p.strip()), "")
        skip = SKIP_MARKER.fullmatch(previous.strip())
        blocks.append(
            Block(
                lang=fence[1],
                code="\n".join(body) + "\n",
                line=start + 1,
                section=section,
                skip=skip["reason"] if skip else None,
            )
        )
    return blocks


BLOCKS = parse_blocks(README.read_text())
RUN = [b for b in BLOCKS if b.skip is None]
FILES = [b for b in RUN if b.filename is not None]
SNIPPETS = [b for b in RUN if b.lang == "python" and b.filename is None]
SHELL = [b for b in RUN if b.lang == "bash"]
SYNOPSES = [b for b in RUN if b.lang == "text" and b.code.startswith("trioworker")]


def section_text(title: str) -> str:
    """The README's text under the heading ``title`` (up to the next heading of its level)."""
    text = README.read_text()
    match = re.search(rf"^(#+) {re.escape(title)}\n(.*?)(?=^\1 |\Z)", text, re.M | re.S)
    assert match, f"README.md has no section {title!r}"
    return match[2]


def test_every_block_is_of_a_kind_this_module_runs() -> None:
    kinds = {id(b) for b in FILES + SNIPPETS + SHELL + SYNOPSES}
    unknown = [f"README.md:{b.line} ```{b.lang}" for b in RUN if id(b) not in kinds]
    assert not unknown, f"blocks no test runs (give them a kind, or a skip marker): {unknown}"
    assert len(BLOCKS) >= 15 and SNIPPETS and SHELL and FILES and SYNOPSES


def test_skips_are_few_and_have_reasons() -> None:
    skipped = [b for b in BLOCKS if b.skip is not None]
    assert len(skipped) <= MAX_SKIPS, [b.id for b in skipped]
    assert all(len(b.skip or "") >= 10 for b in skipped)
    assert README.read_text().count("readme-test:") == len(skipped)  # no marker is lost or stray


def test_every_file_block_is_used() -> None:
    """A file that nothing imports, runs or reads would be a block that is never run."""
    others = "".join(b.code for b in RUN if b.filename is None)
    for block in FILES:
        name = block.filename
        assert name is not None
        used = (
            name == "pyproject.toml"
            or re.search(rf"\b(from|import) {re.escape(name.removesuffix('.py'))}\b", others)
            or re.search(rf"(^|\s){re.escape(name)}\b", others, re.M)
        )
        assert used, f"README.md:{block.line}: nothing imports or runs {name}"
    assert len({b.filename for b in FILES}) == len(FILES), "two blocks write the same file"


def test_snippets_are_complete_programs() -> None:
    for block in SNIPPETS:
        assert re.search(r"^(async )?def main\(", block.code, re.M), (
            f"README.md:{block.line}: a Python block defines main() (or is a file: '# name.py')"
        )
        ellipses = [
            n for n in ast.walk(ast.parse(block.code)) if isinstance(n, ast.Constant) and n.value is ...
        ]
        assert not ellipses, f"README.md:{block.line}: a fragment (it has ``...`` in its code)"


# --------------------------------------------------------------------------- the Quickstart


def test_quickstart_is_the_two_commands() -> None:
    blocks = parse_blocks(section_text("Quickstart"))
    assert [b.code.strip() for b in blocks] == QUICKSTART
    assert all(b.lang == "bash" for b in blocks)


def test_ci_runs_the_quickstart_test_command_with_coverage_only_added() -> None:
    lines = [
        line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith(QUICKSTART[1])
    ]
    assert len(lines) == 1, lines
    added = lines[0].removeprefix(QUICKSTART[1]).split()
    assert added and all(word.startswith("--cov") for word in added), added


def test_every_command_has_help() -> None:
    """``trioworker --help`` (the installed console script) and every subcommand's ``--help``."""
    result = subprocess.run([trioworker_command(), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    for name in subcommands(build_parser()):
        assert re.search(rf"^\s+{name}\s", result.stdout, re.M), f"{name} is not in trioworker --help"
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args([name, "--help"])
        assert exited.value.code == 0


def test_the_demo_command_has_help() -> None:
    result = subprocess.run(
        [trioworker_command(), "demo", "--help"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: trioworker demo")


# --------------------------------------------------------------------------- documented = real


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return dict(actions[0].choices)


def options_of(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {
        option: action
        for action in parser._actions
        for option in action.option_strings
        if not isinstance(action, argparse._HelpAction)
    }


def commands_of(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every command by its name (``""`` for ``trioworker`` itself); a group of commands
    (``schedule``) by the names of its own (``schedule add``), not by its own."""
    commands = {"": parser}
    for name, command in subcommands(parser).items():
        nested = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            commands.update({f"{name} {action}": sub for action, sub in nested[0].choices.items()})
        else:
            commands[name] = command
    return commands


def synopsis_lines() -> dict[str, str]:
    """``{command: its synopsis}`` from the README (``""`` for ``trioworker`` itself; a
    command of a group by both names: ``schedule add``)."""
    assert len(SYNOPSES) == 1, "one synopsis block for the whole command line"
    out: dict[str, str] = {}
    current = None
    for line in SYNOPSES[0].code.splitlines():
        if line.startswith("trioworker"):
            words = line.split()
            current = words[1] if len(words) > 1 and not words[1].startswith("[") else ""
            if len(words) > 2 and re.fullmatch(r"[a-z]+", words[2]):  # a command of a group
                current = f"{current} {words[2]}"
            assert current not in out, f"{current!r} twice in the synopsis"
            out[current] = line
        else:
            assert current is not None and line.startswith(" "), f"synopsis line {line!r}"
            out[current] += " " + line.strip()
    return out


def test_the_synopsis_is_the_real_command_line() -> None:
    commands = commands_of(build_parser())
    synopses = synopsis_lines()
    assert set(synopses) == set(commands), "the synopsis lists exactly the real commands"
    for name, synopsis in synopses.items():
        options = options_of(commands[name])
        shown = re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)(?: ([^\]| ]+))?", synopsis)
        assert {o for o, _ in shown} == set(options), f"trioworker {name}: options differ from --help"
        for option, value in shown:
            default = options[option].default
            if value and not value.isupper() and default is not None:  # a literal: the default
                same = (
                    float(value) == float(default) if isinstance(default, int | float) else value == default
                )
                assert same, f"trioworker {name} {option}: README says {value}, the default is {default}"
        positionals = [a.metavar or a.dest for a in commands[name]._actions if not a.option_strings]
        for positional in positionals:
            if isinstance(positional, str) and name:
                assert positional in synopsis, f"trioworker {name}: {positional} is missing"


def test_every_command_is_described() -> None:
    text = section_text("The command line")
    for name in subcommands(build_parser()):
        assert f"**`trioworker {name}" in text, f"trioworker {name} has no paragraph"


def option_variables() -> dict[str, argparse.Action]:
    """The variable of every option of ``server`` and ``worker``, by the documented rule."""
    commands = subcommands(build_parser())
    return {
        "TRIOWORKER_" + option.removeprefix("--").upper().replace("-", "_"): action
        for name in ("server", "worker")
        for option, action in options_of(commands[name]).items()
        if option.startswith("--")
    }


def test_the_settings_table_lists_every_setting_with_its_default() -> None:
    rows = re.findall(r"^\| `(TRIOWORKER_\w+)` \| ([^|]+) \|", section_text("Settings"), re.M)
    source = "".join(p.read_text() for p in (ROOT / "trioworker").rglob("*.py"))
    used = set(re.findall(r"\bTRIOWORKER_[A-Z_]+\b", source))
    assert {name for name, _ in rows} == used | set(option_variables())
    defaults = dict(rows)
    for variable, action in option_variables().items():
        shown = defaults[variable].strip()
        if variable in ("TRIOWORKER_API_URL", "TRIOWORKER_API_KEY"):  # the clients' settings: below
            pass
        elif any(action.default is unset for unset in (None, False, argparse.SUPPRESS)):
            assert shown == "unset" or variable == "TRIOWORKER_DB", (variable, shown)
        else:
            value = f"{action.default:g}" if isinstance(action.default, float) else str(action.default)
            assert shown == f"`{value}`", (variable, shown, action.default)
        assert f"[env: {variable}]" in (action.help or ""), f"{variable} is not in the option's help"
    assert defaults["TRIOWORKER_DB"].strip() == "`$TRIOWORKER_HOME/trioworker.db`"
    settings = Settings.from_env({})
    assert defaults["TRIOWORKER_API_URL"].strip() == f"`{settings.api_url}`"
    assert Path(defaults["TRIOWORKER_HOME"].strip().strip("`")).expanduser() == settings.home
    assert defaults["TRIOWORKER_API_KEY"].strip() == "unset" and settings.api_key is None


def test_the_public_api_is_documented() -> None:
    text = section_text("The Python API")
    missing = [name for name in trioworker.__all__ if f"`{name}`" not in text]
    assert not missing, f"public names the README's API section does not mention: {missing}"


def test_state_names_are_real() -> None:
    text = README.read_text()
    types_named = set(re.findall(r"\b(SCHEDULED|PENDING|RUNNING|COMPLETED|FAILED|CANCELLED|CRASHED)\b", text))
    assert types_named == {t.value for t in StateType}
    source = "".join(p.read_text() for p in (ROOT / "trioworker").rglob("*.py"))
    for name in ("Scheduled", "AwaitingRetry", "Redelivered"):  # the names SCHEDULED runs have
        assert f"`{name}`" in text and f'"{name}"' in source, name


# --------------------------------------------------------------------------- the files and snippets


#: What a long-running command prints once it listens, per README port it binds.
LISTENING: dict[str, str] = {
    "4300": r"trioworker server listening on http://\S+:(\d+)",
    "4301": r"status server listening on http://\S+:(\d+)",
    "5000": r"Running on http://\S+:(\d+)",
}


@attrs.define
class ReadmeDir:
    path: Path
    #: README port -> the port a command of the test bound for it (and printed).
    ports: dict[str, str] = attrs.field(factory=dict)

    def bind_any(self, text: str) -> str:
        """Where a port is bound (``--port 4300``, ``port=4301``, ``--bind 127.0.0.1:5000``): 0."""
        ports = "|".join(README_PORTS)
        return re.sub(rf"(?:(?<=port )|(?<=port=)|(?<=--bind 127\.0\.0\.1:))(?:{ports})(?!\d)", "0", text)

    def connect(self, text: str) -> str:
        """Where a port is connected to (``http://127.0.0.1:4301``): the port bound for it."""

        def bound(match: re.Match[str]) -> str:
            port = self.ports.get(match[0])
            assert port is not None, f"{text!r} connects to port {match[0]}, which no command bound"
            return port

        return re.sub(rf"(?<=:)(?:{'|'.join(README_PORTS)})(?!\d)", bound, text)

    def learn_ports(self, output: str) -> None:
        for readme_port, printed in LISTENING.items():
            if found := re.search(printed, output):
                self.ports[readme_port] = found[1]


@pytest.fixture
def readme_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ReadmeDir]:
    """A directory with the README's files and a copy of ``examples/``, first on sys.path."""
    directory = ReadmeDir(tmp_path / "readme")
    shutil.copytree(
        ROOT / "examples", directory.path / "examples", ignore=shutil.ignore_patterns("__pycache__")
    )
    for block in FILES:
        assert block.filename is not None
        (directory.path / block.filename).write_text(directory.connect(directory.bind_any(block.code)))
    monkeypatch.syspath_prepend(str(directory.path))
    monkeypatch.delitem(sys.modules, "app", raising=False)
    yield directory
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


@pytest.mark.parametrize("block", SNIPPETS, ids=[b.id for b in SNIPPETS])
async def test_python_snippet(
    block: Block, readme_dir: ReadmeDir, trioworker_server: RunningServer, trioworker_worker: Make
) -> None:
    name = f"readme_{block.id.replace('-', '_')}"
    module = types.ModuleType(name)
    sys.modules[name] = module  # task defaults and error types resolve through sys.modules
    try:
        # Blank lines first, so that tracebacks give the README's line numbers.
        code = compile("\n" * block.line + block.code, str(README), "exec")
        exec(code, module.__dict__)
        main = module.__dict__["main"]
        tasks = [v for v in vars(module).values() if isinstance(v, trioworker.Task)]
        runs_own_workers = re.search(r"\b(TaskWorker|serve)\(", block.code) is not None
        worker: AbstractAsyncContextManager[Any] = (
            nullcontext() if runs_own_workers else trioworker_worker(*tasks)
        )
        async with worker:
            with trio.fail_after(STEP_SECONDS):
                if inspect.iscoroutinefunction(main):
                    await main()
                else:  # blocking code: in a thread, while the worker runs here
                    await trio.to_thread.run_sync(main)
    finally:
        del sys.modules[name]


# --------------------------------------------------------------------------- the shell blocks


def trioworker_command() -> str:
    """The console script of this environment."""
    script = Path(sys.executable).parent / "trioworker"
    assert script.exists(), f"no trioworker script next to {sys.executable}: pip install the project"
    return str(script)


def split_comment(line: str) -> tuple[str, str]:
    """``(command, comment)``: the comment starts at a ``#`` after a space, outside quotes."""
    for match in re.finditer(r"\s#", line):
        before = line[: match.start()]
        if before.count("'") % 2 == 0 and before.count('"') % 2 == 0:
            return before.strip(), line[match.end() :].strip()
    return line.strip(), ""


def check_pip_install(words: list[str]) -> None:
    """``pip install [-e] .[extra]``: the project, with extras it declares (not run here)."""
    assert words[:2] == ["pip", "install"]
    target = [w for w in words[2:] if w != "-e"]
    assert len(target) == 1, words
    match = re.fullmatch(r"\.(?:\[(\w+)\])?", target[0])
    assert match, f"installs something else than this project: {words}"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    if match[1]:
        assert match[1] in pyproject["project"]["optional-dependencies"], words


def check_nox(words: list[str]) -> None:
    """``nox -s a b``: the sessions exist in noxfile.py (not run here: they build virtualenvs)."""
    assert words[:2] == ["nox", "-s"] and len(words) > 2, words
    sessions = re.findall(r"@nox\.session(?:\([^)]*\))?\s*\ndef (\w+)\(", (ROOT / "noxfile.py").read_text())
    assert set(words[2:]) <= set(sessions), words


def check_whole_suite(words: list[str]) -> None:
    """``python -m pytest [--cov...]``: this very suite (checked by the Quickstart tests, not run
    again); coverage options are pytest-cov's, which the ``test`` extra installs."""
    assert words[:3] == ["python", "-m", "pytest"], words
    assert all(word.startswith("--cov") for word in words[3:]), words
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    if words[3:]:
        assert any(d.startswith("pytest-cov") for d in pyproject["project"]["optional-dependencies"]["test"])


#: Commands that are checked, not run.
NOT_RUN: dict[str, Callable[[list[str]], None]] = {
    r"pip install .*": check_pip_install,
    r"nox .*": check_nox,
    r"python -m pytest( --cov\S*)*": check_whole_suite,
}

#: What a long-running command prints once it is ready.
READY: dict[str, str] = {
    r"trioworker server\b.*": r"trioworker server listening on (?P<url>http://\S+)",
    r"trioworker worker\b.*": r"subscribed to",
    r"python \S+\.py": r"subscribed to",  # a worker script
    r"hypercorn\b.*": r"Running on http://",
}


@attrs.define
class Background:
    command: str
    process: trio.Process
    output: str = ""
    ready: trio.Event = attrs.field(factory=trio.Event)
    ended: trio.Event = attrs.field(factory=trio.Event)


@attrs.define
class Session:
    """One bash block: its directory, environment and long-running commands."""

    readme: ReadmeDir
    env: dict[str, str]
    nursery: trio.Nursery
    background: list[Background] = attrs.field(factory=list)
    ran: list[str] = attrs.field(factory=list)

    async def run_lines(self, lines: list[tuple[str, str]]) -> None:
        """Run consecutive foreground lines in one bash (variables carry over)."""
        if not lines:
            return
        script = "\n".join(self.readme.connect(command) for command, _ in lines)
        with trio.fail_after(STEP_SECONDS):
            result = await trio.run_process(
                ["bash", "-e", "-o", "pipefail", "-c", script],
                cwd=self.readme.path,
                env=self.env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        out, err = result.stdout.decode(), result.stderr.decode()
        assert result.returncode == 0, f"{script}\nexited with {result.returncode}:\n{out}\n{err}"
        for _, comment in lines:
            if "prints: " in comment:
                expected = comment.split("prints: ", 1)[1]
                assert expected in out, f"{script}\nshould print {expected!r}; it printed:\n{out}"
        self.ran += [command for command, _ in lines]

    async def start(self, command: str) -> None:
        """Start a long-running command; return once it is ready."""
        ready = next((r for p, r in READY.items() if re.fullmatch(p, command)), None)
        assert ready is not None, f"no readiness pattern for the long-running {command!r}"
        if re.fullmatch(r"trioworker server\b.*", command) and "--port" not in command:
            command += " --port 0"  # its default port may be taken here
        process = await trio.lowlevel.open_process(
            ["bash", "-c", f"exec {self.readme.connect(command)}"],
            cwd=self.readme.path,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        job = Background(command, process)
        self.background.append(job)
        self.nursery.start_soon(self._read, job, ready)
        with trio.fail_after(STEP_SECONDS):
            await job.ready.wait()
        match = re.search(ready, job.output)
        assert match is not None, f"{command} ended before it was ready:\n{job.output}"
        if "url" in match.groupdict():  # the commands after it talk to this server
            self.env["TRIOWORKER_API_URL"] = f"{match['url']}/api"
        self.readme.learn_ports(job.output)  # the ports it bound, for the commands after it
        self.ran.append(command)

    async def _read(self, job: Background, ready: str) -> None:
        assert job.process.stdout is not None
        async with job.process.stdout:
            while chunk := await job.process.stdout.receive_some():
                job.output += chunk.decode(errors="replace")
                if re.search(ready, job.output):
                    job.ready.set()
        job.ready.set()  # it ended: whoever waits sees it
        job.ended.set()

    async def stop_all(self) -> None:
        """Ctrl-C (SIGINT) each long-running command, the last started first: each exits 0."""
        for job in reversed(self.background):
            if job.process.returncode is None:
                job.process.send_signal(signal.SIGINT)
            with trio.fail_after(STEP_SECONDS):
                code = await job.process.wait()
                await job.ended.wait()
            assert code == 0, f"{job.command} exited with {code} after Ctrl-C:\n{job.output}"
        self.background.clear()


@asynccontextmanager
async def session(readme: ReadmeDir, env: dict[str, str]) -> AsyncIterator[Session]:
    async with trio.open_nursery() as nursery:
        shell = Session(readme, env, nursery)
        try:
            yield shell
            await shell.stop_all()
        finally:
            with trio.CancelScope(shield=True):
                for job in shell.background:
                    if job.process.returncode is None:
                        job.process.kill()
                    await job.process.wait()
            nursery.cancel_scope.cancel()


def shell_lines(code: str) -> list[tuple[str, str]]:
    """``(command, comment)`` per logical line (continuations joined, blank lines dropped)."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [split_comment(line) for line in joined.splitlines() if line.strip()]


@pytest.fixture
def shell_env(readme_dir: ReadmeDir, trioworker_server: RunningServer, tmp_path: Path) -> dict[str, str]:
    """This environment's executables first; a server of the test's; a home of its own."""
    env = dict(os.environ)
    env.pop("TRIOWORKER_API_KEY", None)
    env.pop("PYTHONPATH", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["TRIOWORKER_API_URL"] = trioworker_server.api_url
    env["TRIOWORKER_HOME"] = str(tmp_path / "home")
    return env


@pytest.mark.parametrize("block", SHELL, ids=[b.id for b in SHELL])
async def test_shell_block(
    block: Block, readme_dir: ReadmeDir, shell_env: dict[str, str], request: pytest.FixtureRequest
) -> None:
    code = readme_dir.bind_any(block.code)
    left = re.findall(rf"(?<![:\d])(?:{'|'.join(README_PORTS)})(?!\d)", code)
    assert not left, f"README.md:{block.line}: a port neither bound nor connected to: {left}"
    if README_POSTGRES in code:
        code = code.replace(README_POSTGRES, shlex.quote(request.getfixturevalue("postgres_url")))
    async with session(readme_dir, shell_env) as shell:
        pending: list[tuple[str, str]] = []
        for command, comment in shell_lines(code):
            parts = [p.strip() for p in command.split(" && ")]
            for n, part in enumerate(parts):
                checker = next((c for p, c in NOT_RUN.items() if re.fullmatch(p, part)), None)
                if checker is not None:
                    checker(shlex.split(part))
                elif "until Ctrl-C" in comment and n == len(parts) - 1:
                    await shell.run_lines(pending)
                    pending = []
                    await shell.start(part)
                else:
                    pending.append((part, comment))
        await shell.run_lines(pending)
