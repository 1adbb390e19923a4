"""Every command README.md and docs/ show works as written; quoted errors are the code's.

The shell lines of their ```bash / ```sh / ```console blocks that run `python train.py`,
`python -m transformer_jax.X` or `python benchmarks/X.py` (backslash continuations joined, the
lines inside `gcloud ... --command="..."` and `for` loops included) are parsed by each command's
own flag definitions, all in one subprocess and without running a job: the module exists, every
flag exists and takes its value, `--config=` files load, `--config.*` overrides name real
fields and the resulting config passes `experiment.validate`. Each command is run as `python`
would run it, up to its own parse call (argparse's `parse_args`, absl's `app.run`), where the
subprocess stops it; so the flags are the command's, never a copy. Placeholders (DIR, N,
gs://BUCKET, ...) are substituted. A line that is deliberately not runnable ends in
`# not run` and is counted; a line that names a project command in a form the scanner cannot
read fails.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
NOT_RUN = re.compile(r"#\s*not run\s*$")
# What the docs write for values the reader supplies, and what stands in for them here.
PLACEHOLDERS = {
    "DIR": "runs/doc",
    "N": "5",
    "BUCKET": "bucket",
    "NAME": "tpu-name",
    "ZONE": "us-central1-a",
    "REPO": "https://example.com/transformer-jax",
    "OUT": "out",
    "HF_DIR": "opus-mt-en-de",
}
_PLACEHOLDER = re.compile(r"(?<![\w.-])(" + "|".join(PLACEHOLDERS) + r")(?![\w-])")
_VARIABLE = re.compile(r"\$\{?(\w+)\}?")
_ASSIGNMENT = re.compile(r"\w+=.*")
# Separate commands on one line; a redirection takes the next word with it.
_OPERATORS = {"&&", "||", ";", ";;", "|", "|&", "&", "(", ")"}
_REDIRECTIONS = {"<", ">", ">>", "<<", "<<<", ">&", "<&", ">|", "&>"}
_LEADING_KEYWORDS = {"do", "then", "else", "!", "{", "}"}
_CLOSING_KEYWORDS = {"done", "fi", "esac"}
_LOCAL_FILE_COMMANDS = {"cat", "head", "tail", "less", "ls", "cp", "mv", "rm"}


@dataclasses.dataclass(frozen=True)
class Command:
    """One project command of a doc line: `program` is train.py, benchmarks/X.py or a module."""

    where: str
    program: str
    argv: tuple[str, ...]

    def __str__(self) -> str:
        python = "python -m" if not self.program.endswith(".py") else "python"
        return f"{self.where}: {python} {self.program} {shlex.join(self.argv)}"


@dataclasses.dataclass
class Scan:
    """What the scanner found in the docs."""

    commands: list[Command] = dataclasses.field(default_factory=list)
    lines: list[str] = dataclasses.field(default_factory=list)  # file:line of each command line
    not_run: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)


def shell_words(text: str) -> list[str]:
    """The words of a shell line as the shell splits them (operators are words of their own)."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def simple_commands(words: list[str]) -> Iterator[list[str]]:
    """The simple commands of a line's words, without operators and redirections."""
    command: list[str] = []
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word in _REDIRECTIONS:
            skip = True
        elif word in _OPERATORS:
            yield command
            command = []
        else:
            command.append(word)
    yield command


def shell_blocks(text: str) -> Iterator[tuple[bool, list[tuple[int, str]]]]:
    """(is console, numbered lines) of each fenced shell block of a markdown text."""
    block: list[tuple[int, str]] | None = None
    language = ""
    for number, line in enumerate(text.splitlines(), start=1):
        fence = re.match(r"\s*```(\S*)", line)
        if fence and block is None:
            language, block = fence.group(1).lower(), []
        elif fence and block is not None:
            if language in SHELL_BLOCKS:
                yield language == "console", block
            block = None
        elif block is not None:
            block.append((number, line))


def logical_lines(lines: list[tuple[int, str]], console: bool) -> Iterator[tuple[int, str]]:
    """(first line number, text) of each command: continuations and open quotes joined."""
    text, first = "", 0
    for number, line in lines:
        if not text:
            if console and not line.startswith("$ "):
                continue  # a console block's output
            line = line.removeprefix("$ ") if console else line
            first = number
        text += line.rstrip()
        if text.endswith("\\"):
            text = text[:-1] + " "
            continue
        try:
            shell_words(text)
        except ValueError:  # a quoted string that goes on on the next line
            text += "\n"
            continue
        yield first, text
        text = ""
    if text:
        yield first, text


def scan(text: str, name: str) -> Scan:
    """Every project command in the shell blocks of one markdown text."""
    found = Scan()
    for console, block in shell_blocks(text):
        loops: dict[str, list[str]] = {}  # for VAR in ...: the values $VAR takes
        for number, line in logical_lines(block, console):
            where = f"{name}:{number}"
            if NOT_RUN.search(line):
                found.not_run.append(f"{where}: {line.strip()}")
                continue
            before = len(found.commands)
            try:
                for words in simple_commands(shell_words(line)):
                    _classify(words, where, loops, found)
            except ValueError as e:
                found.problems.append(f"{where}: {e}: {line.strip()}")
            if len(found.commands) > before:
                found.lines.append(where)
    return found


def _classify(words: list[str], where: str, loops: dict[str, list[str]], found: Scan) -> None:
    """Add the project commands `words` runs; other tools' commands pass, ValueError if unread."""
    while words and (words[0] in _LEADING_KEYWORDS or _ASSIGNMENT.fullmatch(words[0])):
        words = words[1:]
    if not words or words[0] in _CLOSING_KEYWORDS:
        return
    if words[0] == "for" and len(words) > 2 and words[2] == "in":
        loops[words[1]] = words[3:]
        return
    remote = [w.removeprefix("--command=") for w in words if w.startswith("--command=")]
    remote += [after for w, after in itertools.pairwise(words) if w == "--command"]
    for line in remote:  # gcloud ... ssh --command="...": a line the remote shell runs
        for inner in simple_commands(shell_words(line)):
            _classify(inner, where, loops, found)
    command = None if remote else _project_command(words)
    if command is None:
        return
    program, args = command
    names = sorted({v for arg in args for v in _VARIABLE.findall(arg)})
    unset = [v for v in names if v not in loops]
    if unset:
        raise ValueError(f"${unset[0]} is not a loop variable of its block")
    for values in itertools.product(*(loops[v] for v in names)):
        bound = dict(zip(names, values, strict=True))
        argv = tuple(_substitute(arg, bound) for arg in args)
        found.commands.append(Command(where, program, argv))


def _project_command(words: list[str]) -> tuple[str, list[str]] | None:
    """(program, arguments) of a project command, None for another tool's; ValueError if unread."""
    if Path(words[0]).name not in ("python", "python3"):
        if any("train.py" in w or "transformer_jax" in w or "benchmarks/" in w for w in words):
            raise ValueError("cannot read this command")
        if words[0] in _LOCAL_FILE_COMMANDS and any(w.startswith("gs://") for w in words):
            raise ValueError(f"{words[0]} reads local files; gcloud storage {words[0]} reads gs://")
        return None
    rest = words[1:]
    if not rest or rest[0] == "-c":
        return None  # a REPL, or inline Python
    if rest[0] == "-m" and len(rest) > 1:
        # Another tool's module (pytest, venv) is not ours to check.
        return (rest[1], rest[2:]) if rest[1].startswith("transformer_jax") else None
    if rest[0] == "train.py" or rest[0].startswith("benchmarks/"):
        return rest[0], rest[1:]
    raise ValueError("cannot read this command")


def _substitute(word: str, bound: dict[str, str]) -> str:
    """The word with its loop variables bound and its placeholders replaced."""
    word = _VARIABLE.sub(lambda m: bound[m.group(1)], word)
    return _PLACEHOLDER.sub(lambda m: PLACEHOLDERS[m.group(1)], word)


def scan_docs() -> Scan:
    """scan() over README.md and docs/*.md."""
    found = Scan()
    for path in DOCS:
        one = scan(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
        for field in dataclasses.fields(Scan):
            getattr(found, field.name).extend(getattr(one, field.name))
    return found


def parse_in_subprocess(commands: list[Command]) -> list[str]:
    """Each command's problem ('' if it parses and its config validates), in one subprocess."""
    jobs = [{"program": c.program, "argv": list(c.argv)} for c in commands]
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "results.json"
        done = subprocess.run(
            [sys.executable, __file__, str(results)],
            input=json.dumps(jobs),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env={**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return json.loads(results.read_text())


# Lines that must fail, so a checker that passes everything cannot pass this test.
CANARIES = [
    # The big config averages its last 20 checkpoints, 600 steps apart (issue 25, point 1).
    (
        "python train.py --config=configs/wmt14_ende_big.py --config.train.num_steps=1000",
        "config.train.average_last",
    ),
    ("python train.py --config.train.num_stepz=3", "num_stepz"),
    ("python train.py --config=configs/nonexistent.py", "nonexistent.py"),
    ("python train.py --config=configs/finetune.py --config.model.d_model=64", "model.d_model"),
    ("python train.py --config=configs/finetune.py", "--workdir"),
    ("python train.py --worker=2", "worker"),
    ("python -m transformer_jax.translate --workdir DIR --method grdy", "grdy"),
    ("python -m transformer_jax.translate --workdir DIR --beam_size 0", "beam_size"),
    ("python -m transformer_jax.average --workdir DIR --last", "--last"),
    ("python -m transformer_jax.aot --config=configs/default.py", "topology"),
    ("python -m transformer_jax.aot --config=configs/default.py --topology=v5e-7", "topology"),
    ("python -m transformer_jax.nonexistent --workdir DIR", "nonexistent"),
    ("python benchmarks/train_throughput.py --torch_maloc", "torch_maloc"),
]


def test_every_documented_command_parses_and_validates() -> None:
    """The docs' commands parse with their own flags; their configs pass experiment.validate."""
    start = time.perf_counter()
    found = scan_docs()
    # The scanner finds the docs' commands (a scanner that finds none would pass anything).
    programs = {c.program.split("/")[0] for c in found.commands}
    expected = {"train.py", "benchmarks", "transformer_jax.translate", "transformer_jax.aot"}
    assert expected <= programs, programs
    canaries = [scan(f"```bash\n{line}\n```\n", "canary").commands[0] for line, _ in CANARIES]
    results = parse_in_subprocess(found.commands + canaries)
    doc_results, canary_results = results[: len(found.commands)], results[len(found.commands) :]
    for (line, expected), problem in zip(CANARIES, canary_results, strict=True):
        assert problem and expected in problem, (line, problem)
    failures = found.problems + [
        f"{c}\n    {p}" for c, p in zip(found.commands, doc_results, strict=True) if p
    ]
    if found.not_run:  # in the warnings summary of every run, not only with -s
        warnings.warn(f"not checked, marked '# not run': {found.not_run}", stacklevel=1)
    print(
        f"{len(found.lines)} command lines ({len(found.commands)} commands, loops expanded) "
        f"in {len(DOCS)} files, {len(found.not_run)} marked '# not run'"
        + "".join(f"\n  not run: {line}" for line in found.not_run)
        + f"; {time.perf_counter() - start:.1f} s"
    )
    assert not failures, "\n".join(failures)


def test_scanner_reads_lines_as_the_shell_does() -> None:
    """Continuations, quotes, remote commands, loops, placeholders, marks and refusals."""
    text = """
```bash
# a comment: python train.py --nonsense
python train.py --config=configs/default.py \\
    --workdir=DIR   # trailing comment
gcloud compute tpus tpu-vm ssh NAME --worker=all --command='cd x && python train.py \\
    --distributed --workdir=gs://BUCKET/run'
echo "a && b" | python -m transformer_jax.translate --workdir DIR --step N > out.de
for cfg in base big; do
  python -m transformer_jax.aot --config=configs/wmt14_ende_$cfg.py
done
python -m pytest -q && python -c "
import transformer_jax
"
python train.py --config=configs/X.py   # not run
```

```python
python train.py --not-shell
```

```console
$ python -m transformer_jax.average --workdir DIR --last 5
Averaged steps [1, 2] of DIR
```
"""
    found = scan(text, "t.md")
    assert found.problems == []
    assert [str(c) for c in found.commands] == [
        "t.md:4: python train.py --config=configs/default.py --workdir=runs/doc",
        "t.md:6: python train.py --distributed --workdir=gs://bucket/run",
        "t.md:8: python -m transformer_jax.translate --workdir runs/doc --step 5",
        "t.md:10: python -m transformer_jax.aot --config=configs/wmt14_ende_base.py",
        "t.md:10: python -m transformer_jax.aot --config=configs/wmt14_ende_big.py",
        "t.md:23: python -m transformer_jax.average --workdir runs/doc --last 5",
    ]
    assert found.lines == ["t.md:4", "t.md:6", "t.md:8", "t.md:10", "t.md:23"]
    assert found.not_run == ["t.md:15: python train.py --config=configs/X.py   # not run"]
    refused = scan(
        "```sh\n/usr/bin/time -v python train.py\npython tools/x.py\ncat gs://b/results.json\n"
        "python -m transformer_jax.aot --topology=$t\n```\n",
        "r.md",
    )
    assert [p.split(":")[1] for p in refused.problems] == ["2", "3", "4", "5"], refused.problems
    assert "gcloud storage cat" in refused.problems[2]
    assert "$t is not a loop variable" in refused.problems[3]


# ---------------------------------------------------------------------------------------------
# Quoted error messages: each quote in the docs is what the code says, `...` and the listed
# placeholders standing for any text.


@dataclasses.dataclass(frozen=True)
class Quote:
    doc: str
    text: str
    trigger: Callable[[Path], str]  # makes the error happen in a temporary folder; its message
    placeholders: tuple[str, ...] = ()


def _unaligned(tmp: Path) -> str:
    from transformer_jax.data.sources import text_file_pairs

    (tmp / "a.en").write_text("one\ntwo\nthree\n")
    (tmp / "a.de").write_text("eins\nzwei\n")
    return _message(lambda: text_file_pairs("a.en", "a.de"))


def _not_utf8(tmp: Path) -> str:
    from transformer_jax.data.sources import read_lines

    (tmp / "train.de").write_bytes(b"gut\n" * 4710 + b"\xe9i\n")
    return _message(lambda: read_lines("train.de"))


def _too_few_columns(tmp: Path) -> str:
    from transformer_jax.data.sources import tsv_pairs

    (tmp / "c.tsv").write_text("a\tb\nonly one\n")
    return _message(lambda: tsv_pairs("c.tsv"))


def _tfds_not_prepared(tmp: Path) -> str:
    from transformer_jax.data.sources import tfds_pairs

    message = _message(lambda: tfds_pairs(split="test", data_dir=str(tmp)))
    return f"FileNotFoundError: {message.replace(str(tmp), '/data/tfds')}"


def _does_not_fit(tmp: Path) -> str:
    from transformer_jax import aot

    fields = {f.name: 0 for f in dataclasses.fields(aot.Report)}
    report = aot.Report(**{**fields, "topology": "v5e-8", "mesh": {"data": 8}, "rows": 8})
    report = dataclasses.replace(report, peak_gib=20.0, capacity_gib=16.0)
    return _message(lambda: aot.check_fits(report))


def _lost_peer(tmp: Path) -> str:
    """The watchdog of process 0 of 2 with a clock that jumps 120 s past the peer's last beat."""
    import contextlib
    import io
    import types

    import jax
    from jax._src import distributed as jax_distributed

    from transformer_jax import distributed

    class Service:
        def key_value_set(self, key: str, value: str, allow_overwrite: bool) -> None:
            pass

        def key_value_dir_get(self, prefix: str) -> list[tuple[str, str]]:
            return [(f"{distributed.HEARTBEAT_PREFIX}/1", "0")]  # process 1 never beats again

    clock = iter([0.0, 0.0, 120.4])
    codes: list[int] = []
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(stderr):
        patch.setattr(jax_distributed.global_state, "client", Service())
        # Set here, so no jax backend starts while the fake service is the global client.
        patch.setattr(jax, "process_index", lambda: 0)
        patch.setattr(jax, "process_count", lambda: 2)
        patch.setattr(distributed, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))
        watchdog = distributed.PeerWatchdog(120.0, interval_s=0.001, exit_fn=codes.append)
        watchdog.start()
        deadline = time.monotonic() + 10
        while not codes and time.monotonic() < deadline:
            time.sleep(0.01)
    assert codes == [distributed.LOST_PEER_EXIT], stderr.getvalue()
    return stderr.getvalue()


def _message(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except Exception as e:
        return str(e)
    raise AssertionError(f"{fn} raised nothing")


QUOTES = [
    Quote(
        "docs/data.md",
        "a.en has 3 lines but a.de has 2; the files must be line-aligned",
        _unaligned,
    ),
    Quote(
        "docs/data.md",
        r"train.de:4711: invalid UTF-8 (bytes b'\xe9i\n'); re-encode the text as UTF-8",
        _not_utf8,
    ),
    Quote("docs/data.md", "c.tsv:2: 1 tab-separated column(s), but ... need 2", _too_few_columns),
    Quote(
        "docs/data.md",
        "FileNotFoundError: tfds wmt14_translate/de-en split='test' data_dir=/data/tfds: not "
        "prepared (no array_record files under ...). Run `tfds build wmt14_translate/de-en "
        "--file_format=array_record --data_dir=DIR` (TensorFlow is not needed), then pass "
        "data_dir=DIR; or call with download=True.",
        _tfds_not_prepared,
    ),
    Quote("docs/training.md", "FILE:LINE: invalid UTF-8 (bytes ...)", _not_utf8, ("FILE", "LINE")),
    Quote("docs/tpu.md", "needs X GiB per chip, has Y GiB ...", _does_not_fit, ("X", "Y")),
    Quote(
        "docs/scaling.md",
        "error: process 0: process 1 of 2 has sent no heartbeat for 120 s (it died, hangs, or "
        "lost its network). Exiting instead of waiting in a collective; restart the job on "
        "every host to resume from the last checkpoint.",
        _lost_peer,
    ),
]


@pytest.mark.parametrize("quote", QUOTES, ids=lambda q: f"{q.doc}:{q.trigger.__name__}")
def test_quoted_errors_are_what_the_code_says(
    quote: Quote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The doc quotes the text (line breaks aside), and the code's message matches it."""
    doc = " ".join((ROOT / quote.doc).read_text(encoding="utf-8").split())
    assert " ".join(quote.text.split()) in doc, f"{quote.doc} no longer quotes: {quote.text}"
    monkeypatch.chdir(tmp_path)
    message = quote.trigger(tmp_path)
    pattern = r"\s+".join(re.escape(word) for word in quote.text.split())
    pattern = pattern.replace(re.escape("..."), ".*?")
    for placeholder in quote.placeholders:
        pattern = pattern.replace(placeholder, r"\S+?")
    assert re.search(pattern, message, re.DOTALL), f"{quote.doc}: {quote.text}\ncode: {message}"


# ---------------------------------------------------------------------------------------------
# The subprocess: `python tests/test_docs_commands.py RESULTS.json < jobs`.


class _Parsed(BaseException):  # not an error: the command reached its parse call
    """Raised where a command would start its work: its flags are parsed."""

    def __init__(self, kind: str, value: Any) -> None:
        super().__init__(kind)
        self.kind, self.value = kind, value


def _run_until_parsed(program: str) -> _Parsed:
    """Run program as `python` would, stopping it at its parse call (sys.argv is set)."""
    import argparse
    import runpy

    from absl import app, flags

    parse_args = argparse.ArgumentParser.parse_args

    def stop_at_argparse(self: Any, args: Any = None, namespace: Any = None) -> Any:
        raise _Parsed("argparse", parse_args(self, args, namespace))

    def stop_at_absl(main: Any, argv: Any = None, **kwargs: Any) -> None:
        raise _Parsed("absl", flags.FLAGS(sys.argv if argv is None else argv))

    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        # runpy warns when a module it runs was imported earlier (by another command here).
        warnings.simplefilter("ignore", RuntimeWarning)
        patch.setattr(argparse.ArgumentParser, "parse_args", stop_at_argparse)
        patch.setattr(app, "run", stop_at_absl)
        try:
            if program.endswith(".py"):
                runpy.run_path(str(ROOT / program), run_name="__main__")
            else:
                runpy.run_module(program, run_name="__main__", alter_sys=True)
        except _Parsed as parsed:
            return parsed
    raise AssertionError(f"{program} finished without parsing flags")


def _check_parsed(parsed: _Parsed, stand_in: Path) -> None:
    """What the command checks before any work: decoding flags, the config, the topology."""
    from absl import flags
    from etils import epath

    from transformer_jax import aot, experiment
    from transformer_jax.cli import decoding_kwargs

    if parsed.kind == "argparse":
        if hasattr(parsed.value, "beam_size"):
            decoding_kwargs(parsed.value)
        return
    if parsed.value[1:]:
        raise ValueError(f"unexpected arguments {parsed.value[1:]}")
    values = flags.FLAGS
    if "topology" in values and values.topology != "local":
        aot.parse_topology(values.topology)
    if "config" not in values:
        return
    config = values.config
    if config.get("model_from_workdir"):
        if not values.workdir:
            raise ValueError("config.model_from_workdir=True takes the model from --workdir")
        # The imported workdir's model_config.json: the tiny preset stands in for it.
        config = experiment.adopt_workdir_model(config, epath.Path(stand_in))
    experiment.validate(config)


def _parse_one(program: str, argv: list[str], stand_in: Path) -> str:
    """'' if the command parses and passes its checks, else what is wrong."""
    import contextlib
    import io

    from absl import flags

    sys.argv = [program, *argv]
    defined = set(flags.FLAGS)
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            _check_parsed(_run_until_parsed(program), stand_in)
        return ""
    except SystemExit as e:  # argparse's usage errors, a command's own `error:` exits
        return f"exit {e.code}: {output.getvalue().strip()}"
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    finally:
        # The command's own flags (absl names a script's module by its path) and its config
        # overrides go, so the next command defines its own; flags of the libraries it
        # imported stay with them.
        for name in set(flags.FLAGS) - defined:
            if "." in name or flags.FLAGS.find_module_defining_flag(name, "").endswith(".py"):
                delattr(flags.FLAGS, name)
        flags.FLAGS.unparse_flags()


def _worker(results_path: str) -> None:
    sys.path.insert(0, str(ROOT))  # configs/ imports as from the repository root
    from transformer_jax.config import ModelConfig

    jobs = json.load(sys.stdin)
    with tempfile.TemporaryDirectory() as tmp:
        stand_in = Path(tmp) / "model_config.json"
        ModelConfig.preset("tiny").save(stand_in)
        results = [_parse_one(job["program"], job["argv"], stand_in) for job in jobs]
    Path(results_path).write_text(json.dumps(results))


if __name__ == "__main__":
    _worker(sys.argv[1])
