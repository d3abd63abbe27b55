"""Helpers of the command line, shared by ``dg-lightning``'s subcommands and the bench scripts.

* :func:`split_overrides`: ``[own args] -- [CLI overrides for every run]``;
* :func:`guarded`: the one error path: a :class:`~dg_lightning.core.errors.DGError` (or an error
  caused by one) is printed as its message, in a few lines, and the command exits with its status
  (2; 3 for a diverged run); ``--debug`` or ``DG_DEBUG=1`` shows the traceback instead;
* :func:`explain_parse_error`: jsonargparse's parse errors reduced to the key at fault, the
  underlying complaint and the closest valid key;
* :func:`quiet_third_party`: drops four messages of third-party libraries that are never about
  the user's run (each at its own source; every other warning still shows).

Importing this module is cheap (no torch, no Lightning): the bench scripts import it too.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import re
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterable

DEBUG_FLAG = "--debug"
DEBUG_HINT = "(the traceback: rerun with --debug, or DG_DEBUG=1)"


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the script's own arguments, CLI overrides after ``--`` passed on to every run)."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


# -- the error path ---------------------------------------------------------------------------------
def debug_enabled() -> bool:
    return os.environ.get("DG_DEBUG", "").lower() not in ("", "0", "false", "no")


def take_debug_flag(argv: list[str]) -> list[str]:
    """``argv`` without ``--debug``; the flag sets ``DG_DEBUG=1``, which child processes (``lodo``'s
    runs, a sweep trial) inherit."""
    if DEBUG_FLAG in argv:
        os.environ["DG_DEBUG"] = "1"
    return [a for a in argv if a != DEBUG_FLAG]


def format_user_error(err) -> str:
    from dg_lightning.core.errors import user_message

    return f"error: {user_message(err)}\n{DEBUG_HINT}"


def guarded(fn: Callable[[], int | None]) -> int:
    """Run ``fn`` (a subcommand); return its exit status. A user error (a ``DGError`` anywhere in the
    exception's cause chain) is printed as its message and returns the error's ``exit_code``;
    with ``DG_DEBUG`` set it is raised, traceback and all. Every other exception is raised: a bug."""
    from dg_lightning.core.errors import find_user_error

    try:
        return int(fn() or 0)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        err = find_user_error(e)
        if err is None or debug_enabled():
            raise
        sys.stdout.flush()
        print(format_user_error(err), file=sys.stderr, flush=True)
        return err.exit_code


# -- jsonargparse's parse errors ------------------------------------------------------------------
_UNION = "Does not validate against any of the Union subtypes"
_NONE = "Expected a <class 'NoneType'>"


def _dedent(text: str) -> str:
    return textwrap.dedent(text.strip("\n")).strip()


def _bullets(block: str) -> list[str]:
    """The ``- `` items at the first bullet's indentation, each dedented; the list ends at a line
    indented less than its bullets (``Given value: ...`` after ``Errors:``)."""
    items: list[list[str]] = []
    indent = None
    for ln in block.splitlines():
        if not ln.strip():
            continue
        here = len(ln) - len(ln.lstrip())
        if indent is None:
            if not ln.lstrip().startswith("- "):
                continue
            indent = here
        if here < indent:
            break
        if here == indent and ln.lstrip().startswith("- "):
            items.append([" " * (indent + 2) + ln.lstrip()[2:]])
        elif items:
            items[-1].append(ln)
    return [_dedent("\n".join(it)) for it in items]


class _Parse:
    """What one of jsonargparse's nested error messages says: the key path, the class whose
    arguments were being parsed, and the innermost complaint."""

    def __init__(self, message: str):
        self.keys: list[str] = []
        self.cls: str | None = None
        self.top_cls: str | None = None  # the model's or data module's class
        self.what = _readable(self._peel(message))

    def _key(self, key: str) -> None:
        if self.cls is not None and self.keys and self.keys[-1] != "init_args":
            self.keys.append("init_args")
        self.keys.append(key)

    def _peel(self, text: str) -> str:
        text = _dedent(text)
        m = re.match(r'Parser key "([^"]+)":', text)
        if m:
            self._key(m.group(1))
            return self._peel(text[m.end():])
        m = re.match(r"Problem with given class_path '([\w.]+)':", text)
        if m:
            self.cls = m.group(1)
            if len(self.keys) == 1:
                self.top_cls = self.cls
            return self._peel(text[m.end():])
        if text.startswith(_UNION) and "Errors:" in text:
            errors = [e for e in _bullets(text.split("Errors:", 1)[1]) if not e.startswith(_NONE)]
            if errors:
                given = re.search(r"^\s*Given value: (.*)$", text, re.M)
                if errors[0].startswith("Expected a") and given:
                    return f"{errors[0]}, got {given.group(1)!r}"
                return self._peel(errors[0])
        if text.startswith("- "):  # alternatives (a config file path, or a class): the class's complaint
            errors = _bullets(text)
            return self._peel(next((e for e in errors if _UNION in e), errors[0]))
        m = re.search(r"Got value: Namespace\(class_path='([\w.]+)'", text)
        if m:  # a callable's class (an optimizer): its arguments are the ones at fault
            if self.keys and self.keys[-1] != "init_args":
                self.keys.append("init_args")
            self.cls = m.group(1)
        text = re.sub(r"^Type .*? expects a function or a callable class: ", "", text)
        got = re.search(r"\.? Got value: (.*)$", text, flags=re.S)
        if got:
            text = text[:got.start()] + (f", got {got.group(1).strip()!r}" if text.startswith("Expected") else "")
        return " ".join(ln.strip() for ln in text.splitlines() if ln.strip())


def _readable(text: str) -> str:
    """``Expected a <class 'int'>`` -> ``expected an int``; ``typing.Literal['a', 'b']`` -> ``one of 'a', 'b'``."""
    text = re.sub(r"<class '(?:builtins\.)?([\w.]+)'>", r"\1", text)
    text = re.sub(r"typing\.Literal\[(.*?)\]", r"one of \1", text)
    text = re.sub(r"^Expected a (one of)", r"expected \1", text)
    text = re.sub(r"^Expected a (int|float|bool|str)\b", lambda m: f"expected a{'n' if m.group(1) == 'int' else ''} {m.group(1)}", text)
    return text


def class_keys(class_path: str) -> list[str]:
    """The init arguments jsonargparse accepts for ``class_path`` (``**kwargs`` followed to the bases)."""
    try:
        from jsonargparse import ArgumentParser

        module, name = class_path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        p = ArgumentParser(exit_on_error=False)
        p.add_class_arguments(cls, "x", fail_untyped=False)
        return sorted({a.dest[2:] for a in p._actions if a.dest.startswith("x.")} - {"__path__"})
    except Exception:  # only a suggestion: never fail on it
        return []


def parser_keys(parser, subcommand: str | None) -> list[str]:
    """Every option key (``trainer.max_epochs``) of the (sub)command's parser."""
    sub = getattr(getattr(parser, "_subcommands_action", None), "_name_parser_map", {}).get(subcommand)
    return sorted({a.dest for a in (sub or parser)._actions
                   if a.dest and a.dest not in ("help", "config", "print_config")})


def closest(word: str, candidates: Iterable[str]) -> str | None:
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return match[0] if match else None


def _suggest(word: str, candidates: list[str]) -> str | None:
    """The closest candidate to ``word``, also comparing only the last dotted part of each."""
    near = closest(word, candidates)
    if near:
        return near
    last = {c.rsplit(".", 1)[-1]: c for c in candidates}
    near = closest(word.rsplit(".", 1)[-1], last)
    return last[near] if near else None


def explain_parse_error(message: str, parser=None, subcommand: str | None = None) -> str:
    """A few lines for one of jsonargparse's parse errors: the key at fault, the innermost
    complaint (not the Union alternatives around it), the closest valid key or class when a name
    is unknown, and where to see every accepted key."""
    e = _Parse(message)
    key = ".".join(e.keys)
    help_hint = f"every accepted key: dg-lightning {subcommand or 'fit'} --help"
    if e.top_cls:
        help_hint += f"; {e.top_cls}'s: dg-lightning {subcommand or 'fit'} --{e.keys[0]}.help {e.top_cls}"
    fix = None
    unknown = re.search(r"(?:Option|Key|key|option) '([^']+)' (?:is not accepted|is not expected)", e.what) or \
        re.search(r"does not accept (?:option|nested key) '([^']+)'", e.what)
    if unknown and e.cls:
        near = _suggest(unknown.group(1), class_keys(e.cls))
        prefix = "" if not key else key + "." if key.endswith("init_args") else key + ".init_args."
        fix = near and f"did you mean '{prefix}{near}'?"
        what = f"{e.cls} has no argument '{unknown.group(1)}'"
    elif unknown and parser is not None:
        near = _suggest(unknown.group(1), parser_keys(parser, subcommand))
        fix = near and f"did you mean '{near}'?"
        what = f"unknown config key '{unknown.group(1)}'"
    else:
        what = e.what
        missing = re.search(r"module '([\w.]+)' has no attribute '(\w+)'", e.what)
        if missing:
            module = importlib.import_module(missing.group(1))
            names = [n for n in dir(module) if isinstance(getattr(module, n), type)]
            near = closest(missing.group(2), names)
            what = f"no class {missing.group(1)}.{missing.group(2)}"
            fix = f"did you mean '{missing.group(1)}.{near}'?" if near else f"choose one of {', '.join(names)}"
    lines = [f"config key '{key}': {what}" if key and not unknown else what]
    if fix:
        lines.append(f"  fix: {fix}")
    lines.append(f"  {help_hint}")
    return "\n".join(lines)


# -- quiet by default -------------------------------------------------------------------------------
_LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"


class _DropLitLoggerTip(logging.Filter):
    """Lightning >= 2.6 logs an advertisement for its cloud logger whenever no LitLogger is used."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_LITLOGGER_TIP)


def quiet_third_party() -> None:
    """Silence, each at its source, messages that are not about the user's run:

    * Lightning's litlogger tip: a filter on Lightning's rank-zero logger that drops that one record;
    * torch >= 2.10's FutureWarning about ``LeafSpec``, raised inside Lightning's own ``_pytree``
      helper (nothing the user can change): ignored for that message only;
    * W&B's "anonymous setting has no effect": the W&B logger no longer passes the setting
      (:func:`dg_lightning.core.logging.default_loggers`);
    * ``fit(ckpt_path="last") is set, but there is no last checkpoint``: ``lodo`` asks to resume
      only when a ``last.ckpt`` exists (:func:`dg_lightning.eval.lodo.run_one`).

    Every other warning, the user's own included, still shows.
    """
    os.environ.setdefault("WANDB_SILENT", "true")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropLitLoggerTip) for f in log.filters):
            log.addFilter(_DropLitLoggerTip())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
