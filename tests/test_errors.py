"""The error catalogue stays one: every code once, each with an HTTP status, defined only in errors/."""

import ast
import importlib
import json
import pkgutil
from pathlib import Path

import pytest

import errors
from api.problems import PROBLEM_JSON, register
from errors import LaxError

ROOT = Path(__file__).resolve().parent.parent
OUR_CODE = ("api", "bench", "cli", "config", "lab", "models", "tasks", "workers")


def catalogue() -> list[type[LaxError]]:
    """LaxError and every subclass reachable from the names the catalogue module defines."""
    found: list[type[LaxError]] = []
    todo = [value for value in vars(errors).values() if isinstance(value, type) and issubclass(value, LaxError)]
    while todo:
        cls = todo.pop()
        if cls not in found:
            found.append(cls)
            todo.extend(cls.__subclasses__())
    return sorted(found, key=lambda cls: cls.code)


def test_every_code_is_defined_once_in_the_catalogue():
    classes = catalogue()
    by_code: dict[str, list[str]] = {}
    for cls in classes:
        assert "code" in vars(cls), f"{cls.__qualname__} inherits its code: give it its own"
        by_code.setdefault(cls.code, []).append(f"{cls.__module__}.{cls.__qualname__}")
    assert {code: where for code, where in by_code.items() if len(where) > 1} == {}
    assert {cls.__module__ for cls in classes} == {"errors"}
    assert len(classes) > 50  # the whole catalogue, not a part of it


@pytest.mark.parametrize("cls", catalogue(), ids=lambda cls: cls.code)
def test_each_code_has_an_error_status_and_leaves_the_api_as_that_problem(cls):
    assert 400 <= cls.http_status < 600, (cls.code, cls.http_status)
    from flask import Flask
    app = Flask(__name__)
    register(app)

    @app.get("/raise")
    def _raise():
        raise cls("it went wrong", field="name")

    response = app.test_client().get("/raise")
    body = json.loads(response.data)
    assert (response.status_code, response.mimetype) == (cls.http_status, PROBLEM_JSON)
    assert (body["code"], body["status"], body["detail"], body["field"]) == (cls.code, cls.http_status, "it went wrong", "name")


def _base_names(node: ast.ClassDef) -> set[str]:
    names = set()
    for base in node.bases:
        if isinstance(base, ast.Name):
            names.add(base.id)
        elif isinstance(base, ast.Attribute):
            names.add(base.attr)
    return names


def _sets_code(node: ast.ClassDef) -> bool:
    for statement in node.body:
        targets = statement.targets if isinstance(statement, ast.Assign) else [getattr(statement, "target", None)]
        if any(isinstance(target, ast.Name) and target.id == "code" for target in targets):
            return True
    return False


def test_no_module_outside_the_catalogue_defines_an_error_code():
    """Source scan: a class deriving (directly or through our other classes) from a LaxError,
    with its own `code = ...`, anywhere but errors/ is a second catalogue starting."""
    classes = [(path, node) for folder in OUR_CODE for path in sorted((ROOT / folder).rglob("*.py"))
               if ".venv" not in path.parts
               for node in ast.walk(ast.parse(path.read_text(), str(path))) if isinstance(node, ast.ClassDef)]
    lax = {cls.__name__ for cls in catalogue()}
    grew = True
    while grew:  # a local subclass of a subclass of LaxError is one too
        before = len(lax)
        lax |= {node.name for _, node in classes if _base_names(node) & lax}
        grew = len(lax) > before
    strays = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name}" for path, node in classes
              if _base_names(node) & lax and _sets_code(node)]
    assert strays == [], "define error codes in errors/__init__.py"


def test_loaded_errors_all_come_from_the_catalogue():
    """Runtime check over whatever is imported: no LaxError subclass is made elsewhere (e.g. dynamically)."""
    for package in ("api", "cli", "lab", "tasks", "workers"):
        for module in pkgutil.walk_packages(importlib.import_module(package).__path__, f"{package}."):
            importlib.import_module(module.name)
    found, todo = [], [LaxError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    assert [f"{cls.__module__}.{cls.__qualname__}" for cls in found if cls.__module__ != "errors"] == []
