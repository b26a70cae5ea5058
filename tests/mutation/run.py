"""Mutation testing of the pure core (``mesh/_core``): which changes to the code no test notices.

Run ``make mutation`` (or ``python tests/mutation/run.py [MODULE ...]``); ``docs/testing.md``
says how to read the result. A mutant is the core with one small change (an operator, a
constant, a refusal removed, a call dropped); it is *killed* when a unit test fails on it and
*survives* when every test still passes. For each module the run prints the mutants, how many
were killed and survived, the score (killed / (mutants - accepted)) and each survivor as
``file:line [function] `before` -> `after```.

How it is fast enough on two cores, one mutant at a time:

- pytest collects the unit tests once, in this process; each mutant runs in a forked child that
  swaps the mutated function's code object in place (``function.__code__``), so every module
  that imported the function sees the mutant, and nothing has to be imported again;
- one run under coverage first records which tests execute each line, so a mutant runs only
  the tests that reach it, and stops at the first failure;
- a change outside any function body (a module constant, a default argument, a class
  attribute) cannot be swapped in that way: such a mutant runs in a fresh interpreter that
  imports the mutated module from source, against the tests that reach the module.

Mutants that no test can observe (equivalent ones) or that are accepted for a stated reason are
listed in ``tests/mutation/accepted.toml`` with the reason; they are reported apart and left out
of the score.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import faulthandler
import gc
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "mesh" / "_core"
ACCEPTED = Path(__file__).with_name("accepted.toml")
TESTS = ("tests/unit", "tests/security/test_decoder_properties.py")
SKIP_MODULES = {"__init__.py", "__main__.py"}


# --- the mutants ------------------------------------------------------------------------------

_CMP_SWAP: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}
_BIN_SWAP: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Mult,
    ast.Mod: ast.FloorDiv,
    ast.Pow: ast.Mult,
    ast.LShift: ast.RShift,
    ast.RShift: ast.LShift,
    ast.BitOr: ast.BitAnd,
    ast.BitAnd: ast.BitOr,
    ast.BitXor: ast.BitAnd,
}


@dataclass(frozen=True)
class Mutant:
    """One change to one module."""

    path: Path
    index: int  # the order in which the visitor meets mutation points
    line: int  # the line of the changed node
    stmt_line: int  # the first line of the statement holding it (coverage's line)
    unit: str | None  # qualified name of the function whose code changes; None: module level
    unit_line: int  # that function's first line (its ``co_firstlineno``)
    before: str
    after: str

    @property
    def module(self) -> str:
        return ".".join(self.path.relative_to(ROOT).with_suffix("").parts)

    @property
    def rel(self) -> str:
        return self.path.relative_to(ROOT).as_posix()

    @property
    def where(self) -> str:
        return self.unit or "<module>"

    @property
    def change(self) -> str:
        return f"`{self.before}` -> `{self.after}`"


def _short(node: ast.AST) -> str:
    text = ast.unparse(node).replace("\n", "; ")
    return text if len(text) <= 70 else text[:67] + "..."


class _Visitor(ast.NodeTransformer):
    """Meets mutation points in a fixed order; records them, or applies the one numbered
    ``target``."""

    def __init__(self, path: Path, target: int | None = None) -> None:
        self.path = path
        self.target = target
        self.found: list[Mutant] = []
        self.count = 0
        self.scope: list[str] = []
        self.unit: str | None = None
        self.unit_line = 0
        self.in_function = False
        self.stmt_line = 0

    # one point: returns the replacement when this point is the target
    def _point(self, node: ast.AST, after: ast.AST | None, text: str | None = None) -> bool:
        index = self.count
        self.count += 1
        if self.target is None:
            before = _short(node)
            self.found.append(
                Mutant(
                    self.path,
                    index,
                    getattr(node, "lineno", self.stmt_line),
                    self.stmt_line,
                    self.unit,
                    self.unit_line,
                    before,
                    text if text is not None else (_short(after) if after else "pass"),
                )
            )
        return index == self.target

    def visit(self, node: ast.AST) -> Any:
        if isinstance(node, ast.stmt):
            saved, self.stmt_line = self.stmt_line, node.lineno
            try:
                return super().visit(node)
            finally:
                self.stmt_line = saved
        return super().visit(node)

    def _body(self, stmts: list[ast.stmt]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for i, stmt in enumerate(stmts):
            if i == 0 and _is_docstring(stmt):
                out.append(stmt)
                continue
            new = self.visit(stmt)
            if new is None:
                continue
            out.extend(new if isinstance(new, list) else [new])
        return out or [ast.Pass()]

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.AST:
        # Defaults run where the def runs; decorators and annotations are left alone.
        node.args.defaults = [self.visit(d) for d in node.args.defaults]
        node.args.kw_defaults = [d if d is None else self.visit(d) for d in node.args.kw_defaults]
        self.scope.append(node.name)
        saved = self.unit, self.unit_line, self.in_function
        if self.unit is None:  # co_firstlineno is the first decorator's line
            first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            self.unit, self.unit_line = ".".join(self.scope), first
        self.scope.append("<locals>")
        self.in_function = True
        node.body = self._body(node.body)
        self.unit, self.unit_line, self.in_function = saved
        self.scope.pop()
        self.scope.pop()
        return node

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    def visit_Lambda(self, node: ast.Lambda) -> ast.AST:
        node.body = self.visit(node.body)
        return node

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        self.scope.append(node.name)
        node.body = self._body(node.body)
        self.scope.pop()
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        if node.value is not None:
            node.value = self.visit(node.value)
        return node

    def visit_Assign(self, node: ast.Assign) -> ast.AST:
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return node
        return self.generic_visit(node)

    def visit_If(self, node: ast.If) -> Any:
        if _is_type_checking(node.test):
            return node
        node.test = self._condition(node.test)
        node.body = self._body(node.body)
        node.orelse = self._body(node.orelse) if node.orelse else []
        return node

    def visit_While(self, node: ast.While) -> Any:
        node.test = self._condition(node.test)
        node.body = self._body(node.body)
        node.orelse = self._body(node.orelse) if node.orelse else []
        return node

    def visit_IfExp(self, node: ast.IfExp) -> Any:
        node.test = self._condition(node.test)
        node.body = self.visit(node.body)
        node.orelse = self.visit(node.orelse)
        return node

    def _condition(self, test: ast.expr) -> ast.expr:
        if not isinstance(test, ast.Compare | ast.BoolOp | ast.UnaryOp | ast.Constant):
            negated = ast.UnaryOp(op=ast.Not(), operand=test)
            if self._point(test, negated):
                return ast.copy_location(negated, test)
        result: ast.expr = self.visit(test)
        return result

    def visit_Assert(self, node: ast.Assert) -> ast.AST:
        return node  # invariants for the type checker, not behaviour

    def visit_JoinedStr(self, node: ast.JoinedStr) -> ast.AST:
        return node  # messages: their wording is checked by tests, not mutated

    def visit_Raise(self, node: ast.Raise) -> Any:
        if self.in_function and self._point(node, None, "pass"):
            return ast.copy_location(ast.Pass(), node)
        return node

    def visit_Expr(self, node: ast.Expr) -> Any:
        if (
            self.in_function
            and isinstance(node.value, ast.Call | ast.Await)
            and self._point(node, None, "pass")
        ):
            return ast.copy_location(ast.Pass(), node)
        return self.generic_visit(node)

    def visit_Break(self, node: ast.Break) -> Any:
        if self._point(node, ast.Continue()):
            return ast.copy_location(ast.Continue(), node)
        return node

    def visit_Continue(self, node: ast.Continue) -> Any:
        if self._point(node, ast.Break()):
            return ast.copy_location(ast.Break(), node)
        return node

    def visit_Compare(self, node: ast.Compare) -> Any:
        self.generic_visit(node)
        for i, op in enumerate(node.ops):
            swap = _CMP_SWAP.get(type(op))
            if swap is None:
                continue
            mutated = copy.copy(node)
            mutated.ops = [*node.ops[:i], swap(), *node.ops[i + 1 :]]
            if self._point(node, mutated):
                return ast.copy_location(mutated, node)
        return node

    def visit_BoolOp(self, node: ast.BoolOp) -> Any:
        self.generic_visit(node)
        other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        mutated = ast.BoolOp(op=other, values=node.values)
        if self._point(node, mutated):
            return ast.copy_location(mutated, node)
        return node

    def visit_UnaryOp(self, node: ast.UnaryOp) -> Any:
        self.generic_visit(node)
        if isinstance(node.op, ast.Not | ast.USub) and self._point(node, node.operand):
            return node.operand
        return node

    def visit_BinOp(self, node: ast.BinOp) -> Any:
        self.generic_visit(node)
        swap = _BIN_SWAP.get(type(node.op))
        if swap is not None:
            mutated = ast.BinOp(left=node.left, op=swap(), right=node.right)
            if self._point(node, mutated):
                return ast.copy_location(mutated, node)
        return node

    def visit_AugAssign(self, node: ast.AugAssign) -> Any:
        node.value = self.visit(node.value)
        swap = _BIN_SWAP.get(type(node.op))
        if swap is not None:
            mutated = ast.AugAssign(target=node.target, op=swap(), value=node.value)
            if self._point(node, mutated):
                return ast.copy_location(mutated, node)
        return node

    def visit_Constant(self, node: ast.Constant) -> Any:
        value = node.value
        new: object
        if isinstance(value, bool):
            new = not value
        elif isinstance(value, int | float):
            new = value + 1
        elif isinstance(value, bytes):
            new = value + b"X"
        else:
            return node  # str (names, messages), None, Ellipsis
        mutated = ast.Constant(value=new)
        if self._point(node, mutated):
            return ast.copy_location(mutated, node)
        return node


def _is_docstring(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, str)
    )


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def mutants_of(path: Path) -> list[Mutant]:
    """Every mutant of one source file, in a fixed order."""
    visitor = _Visitor(path)
    visitor.visit(ast.parse(path.read_text(), str(path)))
    return visitor.found


def mutated_code(mutant: Mutant) -> types.CodeType:
    """The module's code object with the one change applied."""
    tree = ast.parse(mutant.path.read_text(), str(mutant.path))
    visitor = _Visitor(mutant.path, mutant.index)
    tree = visitor.visit(tree)
    ast.fix_missing_locations(tree)
    code: types.CodeType = compile(tree, str(mutant.path), "exec", dont_inherit=True)
    return code


def _find_code(code: types.CodeType, qualname: str, line: int) -> types.CodeType | None:
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            if const.co_qualname == qualname and const.co_firstlineno == line:
                return const
            found = _find_code(const, qualname, line)
            if found is not None:
                return found
    return None


def core_modules(names: Sequence[str]) -> list[Path]:
    """The core's source files, or those whose module name ends with one of ``names``."""
    paths = sorted(p for p in CORE.rglob("*.py") if p.name not in SKIP_MODULES)
    if not names:
        return paths
    chosen = [
        p
        for p in paths
        if any(
            p.relative_to(CORE).with_suffix("").as_posix() in (n, n.replace(".", "/"))
            or p.stem == n
            for n in names
        )
    ]
    if not chosen:
        raise SystemExit(f"no core module named {', '.join(names)}")
    return chosen


def accepted() -> dict[tuple[str, str, str], str]:
    """(file, function, change) -> why the mutant is accepted, from accepted.toml."""
    if not ACCEPTED.exists():
        return {}
    data = tomllib.loads(ACCEPTED.read_text())
    return {
        (entry["file"], entry["function"], entry["change"]): entry["reason"]
        for entry in data.get("mutant", [])
    }


# --- running the tests ------------------------------------------------------------------------


def _hypothesis_profile() -> None:
    # The same examples every run (a mutant's fate must not depend on luck), no shrinking
    # (a failure is all a mutant needs), no example database, no timing health checks.
    from hypothesis import HealthCheck, Phase, settings

    settings.register_profile(
        "mutation",
        database=None,
        derandomize=True,
        deadline=None,
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    settings.load_profile("mutation")


@dataclass
class _Plan:
    mutants: list[Mutant]
    results: dict[Mutant, str] = field(default_factory=dict)


def _run_items(items: Sequence[Any]) -> bool:
    """Run pytest items in this process; True when all passed."""
    from _pytest.runner import runtestprotocol

    for item in items:
        reports = runtestprotocol(item, log=False, nextitem=None)
        if any(r.failed for r in reports):
            return False
    return True


def _fork(run: Any, timeout: float) -> tuple[int | None, float]:
    """Run ``run()`` (returns an exit code) in a forked child, output discarded; its exit code
    (None when it timed out) and its duration."""
    start = time.monotonic()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child
        code = 3
        try:
            faulthandler.disable()  # a mutant that crashes needs no traceback
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            code = run()
        finally:
            os._exit(code)
    deadline = start + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), time.monotonic() - start
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None, time.monotonic() - start
        time.sleep(0.005)


class _Loop:
    """A pytest plugin that replaces the test loop by the mutation loop."""

    def __init__(self, plan: _Plan, out: Any) -> None:
        self.plan = plan
        self.out = out

    def pytest_configure(self, config: Any) -> None:
        _hypothesis_profile()  # before the test modules make their settings

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: Any) -> bool:
        items = list(session.items)
        files = sorted({str(m.path) for m in self.plan.mutants})
        lines, durations = self._map(items, files)
        by_id = {item.nodeid: item for item in items}
        functions = self._functions(files)
        reach_module: dict[str, list[str]] = {}
        for f in files:
            reach: set[str] = set()
            for line_ids in lines.get(f, {}).values():
                reach.update(line_ids)
            reach_module[f] = sorted(reach)
        for n, mutant in enumerate(self.plan.mutants, 1):
            if mutant.unit is None:
                ids = reach_module[str(mutant.path)]
            else:
                # The changed node's own line, and its statement's first line: coverage
                # records a multi-line condition on the lines that hold its code.
                by_line = lines.get(str(mutant.path), {})
                ids = sorted(
                    set(by_line.get(str(mutant.stmt_line), []))
                    | set(by_line.get(str(mutant.line), []))
                )
            if not ids:
                self.plan.results[mutant] = "uncovered"
            else:
                ids = sorted(ids, key=lambda i: durations[i])  # the quick ones kill first
                budget = 3 * sum(durations[i] for i in ids) + 5
                chosen = [by_id[i] for i in ids]
                self.plan.results[mutant] = self._one(mutant, chosen, functions, budget)
            if n % 50 == 0 or n == len(self.plan.mutants):
                print(f"  {n}/{len(self.plan.mutants)} mutants run", file=self.out, flush=True)
        return True

    def _map(
        self, items: Sequence[Any], files: list[str]
    ) -> tuple[dict[str, dict[str, list[str]]], dict[str, float]]:
        """Run every test once, unmutated, under coverage: which tests reach each line."""
        print(
            f"  mapping {len(items)} tests to lines (one unmutated run)", file=self.out, flush=True
        )
        with tempfile.NamedTemporaryFile("r", suffix=".json") as result:

            def run() -> int:
                import coverage

                cov = coverage.Coverage(
                    data_file=None, config_file=False, include=files, branch=False
                )
                found: dict[str, dict[str, list[str]]] = {}
                durations: dict[str, float] = {}
                failed: list[str] = []
                cov.start()
                for item in items:
                    cov.switch_context(item.nodeid)
                    start = time.monotonic()
                    if not _run_items([item]):
                        failed.append(item.nodeid)
                    durations[item.nodeid] = time.monotonic() - start
                cov.stop()
                data = cov.get_data()
                for f in files:
                    by_line = data.contexts_by_lineno(f)
                    found[f] = {
                        str(line): [c for c in ctxs if c and c not in failed]
                        for line, ctxs in by_line.items()
                    }
                Path(result.name).write_text(
                    json.dumps({"lines": found, "durations": durations, "failed": failed})
                )
                return 0

            code, took = _fork(run, timeout=1800)
            if code != 0:
                raise SystemExit(f"the unmutated run failed (exit {code})")
            data = json.loads(Path(result.name).read_text())
        if data["failed"]:
            print(f"  left out, failing unmutated: {', '.join(data['failed'])}", file=self.out)
        print(f"  mapped in {took:.0f} s", file=self.out, flush=True)
        return data["lines"], data["durations"]

    @staticmethod
    def _functions(files: list[str]) -> dict[tuple[str, str, int], list[types.FunctionType]]:
        """Live function objects by (file, qualified name, first line)."""
        wanted = set(files)
        table: dict[tuple[str, str, int], list[types.FunctionType]] = {}
        for obj in gc.get_objects():
            if isinstance(obj, types.FunctionType):
                code = obj.__code__
                if code.co_filename in wanted:
                    key = (code.co_filename, code.co_qualname, code.co_firstlineno)
                    table.setdefault(key, []).append(obj)
        return table

    def _one(
        self,
        mutant: Mutant,
        items: list[Any],
        functions: dict[tuple[str, str, int], list[types.FunctionType]],
        budget: float,
    ) -> str:
        try:
            code = mutated_code(mutant)
        except (SyntaxError, ValueError, TypeError):
            return "invalid"
        targets: list[types.FunctionType] = []
        new: types.CodeType | None = None
        if mutant.unit is not None:
            new = _find_code(code, mutant.unit, mutant.unit_line)
            targets = functions.get((str(mutant.path), mutant.unit, mutant.unit_line), [])
        if (
            new is None
            or not targets
            or any(len(f.__code__.co_freevars) != len(new.co_freevars) for f in targets)
        ):
            # By file, not node id: a mutated constant may change the ids of parametrized tests.
            files = sorted({item.nodeid.split("::")[0] for item in items})
            return self._fresh(mutant, files, budget + 10)

        def run() -> int:
            for function in targets:
                function.__code__ = new
            for function in targets:  # functools caches hold results of the unmutated code
                with contextlib.suppress(Exception):
                    function.cache_clear()  # type: ignore[attr-defined]
            return 0 if _run_items(items) else 1

        exit_code, _took = _fork(run, budget)
        return _verdict(exit_code)

    @staticmethod
    def _fresh(mutant: Mutant, ids: list[str], budget: float) -> str:
        """A module-level mutant: a new interpreter imports the mutated module."""
        cmd = [sys.executable, __file__, "--apply", mutant.rel, str(mutant.index), "--", *ids]
        try:
            done = subprocess.run(
                cmd,
                cwd=ROOT,
                timeout=budget,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return "killed (timeout)"
        return _verdict(done.returncode)


def _verdict(exit_code: int | None) -> str:
    if exit_code is None:
        return "killed (timeout)"
    if exit_code < 0:
        return "killed (crash)"  # a signal: the mutant crashed the interpreter (libsodium abort)
    # pytest's 2: a collection error, the mutated module failing to import
    return {0: "survived", 1: "killed", 2: "killed"}.get(exit_code, f"error (exit {exit_code})")


class _MutatedSource(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves one module from its mutated code (used by ``--apply``)."""

    def __init__(self, mutant: Mutant) -> None:
        self.mutant = mutant

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != self.mutant.module:
            return None
        return importlib.util.spec_from_file_location(name, self.mutant.path, loader=self)

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        exec(mutated_code(self.mutant), module.__dict__)


def _apply(rel: str, index: int, pytest_args: list[str]) -> int:
    """``--apply FILE INDEX -- TESTS``: run the tests against one mutant, in this process."""
    mutant = mutants_of(ROOT / rel)[index]
    sys.meta_path.insert(0, _MutatedSource(mutant))
    return int(
        pytest.main(["-x", "-q", "-p", "no:cacheprovider", *pytest_args], plugins=[_Profile()])
    )


class _Profile:
    """A pytest plugin that loads the hypothesis profile (used by ``--apply``)."""

    def pytest_configure(self, config: Any) -> None:
        _hypothesis_profile()


# --- the report -------------------------------------------------------------------------------


def report(plan: _Plan, out: Any) -> bool:
    """Print the table and the survivors; True when nothing survived unaccepted."""
    ok = accepted()
    used: set[tuple[str, str, str]] = set()
    rows: list[tuple[str, int, int, int, int, str]] = []
    survivors: list[Mutant] = []
    accepted_here: list[tuple[Mutant, str]] = []
    files: dict[str, list[Mutant]] = {}
    for mutant in plan.mutants:
        files.setdefault(mutant.rel, []).append(mutant)
    for rel, mutants in files.items():
        killed = survived = excused = 0
        for mutant in mutants:
            verdict = plan.results.get(mutant, "survived")
            if verdict == "invalid":
                continue
            key = (rel, mutant.where, mutant.change)
            if verdict.startswith("killed"):
                killed += 1
            elif key in ok:
                excused += 1
                used.add(key)
                accepted_here.append((mutant, ok[key]))
            else:
                survived += 1
                survivors.append(mutant)
        total = killed + survived + excused
        counted = total - excused
        score = 100.0 * killed / counted if counted else 100.0
        rows.append((rel, total, killed, survived, excused, f"{score:.1f} %"))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'module':<{width}}  mutants  killed  survived  accepted  score", file=out)
    for rel, total, killed, survived, excused, shown in rows:
        print(
            f"{rel:<{width}}  {total:>7}  {killed:>6}  {survived:>8}  {excused:>8}  {shown:>7}",
            file=out,
        )
    if survivors:
        print(f"\nsurvivors ({len(survivors)}):", file=out)
        for mutant in survivors:
            verdict = plan.results.get(mutant, "survived")
            note = " (no test reaches it)" if verdict == "uncovered" else ""
            print(f"  {mutant.rel}:{mutant.line} [{mutant.where}] {mutant.change}{note}", file=out)
    if accepted_here:
        print(f"\naccepted ({len(accepted_here)}, tests/mutation/accepted.toml):", file=out)
        for mutant, reason in accepted_here:
            print(f"  {mutant.rel}:{mutant.line} [{mutant.where}] {mutant.change}", file=out)
            print(f"      {reason}", file=out)
    stale = [k for k in ok if k not in used and k[0] in files]
    if stale:
        print("\naccepted.toml entries that match no surviving mutant (remove them):", file=out)
        for rel, where, change in stale:
            print(f"  {rel} [{where}] {change}", file=out)
    return not survivors


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: ``python tests/mutation/run.py [MODULE ...]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--apply"]:
        sep = args.index("--")
        return _apply(args[1], int(args[2]), args[sep + 1 :])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="core modules (e.g. envelope, policy/engine)")
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="PATH",
        help="leave out a test file (pytest --ignore), e.g. to measure without new tests",
    )
    options = parser.parse_args(args)
    os.chdir(ROOT)
    mutants = [m for path in core_modules(options.modules) for m in mutants_of(path)]
    if options.list:
        for m in mutants:
            print(f"{m.rel}:{m.line} [{m.where}] {m.change}")
        print(f"{len(mutants)} mutants")
        return 0
    start = time.monotonic()
    print(f"mutation testing: {len(mutants)} mutants, tests: {' '.join(TESTS)}", flush=True)
    plan = _Plan(mutants)
    code = pytest.main(
        ["-q", "-p", "no:cacheprovider", *[f"--ignore={p}" for p in options.ignore], *TESTS],
        plugins=[_Loop(plan, sys.stdout)],
    )
    if code not in (0, 5) and len(plan.results) < len(mutants):
        print(f"pytest failed (exit {code})", file=sys.stderr)
        return 2
    clean = report(plan, sys.stdout)
    print(f"\nin {time.monotonic() - start:.0f} s")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
