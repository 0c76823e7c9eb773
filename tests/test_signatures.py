"""Every public function and method of the library has type hints that resolve: names imported
only for type checking (``if TYPE_CHECKING:``) included, so that a misspelt or stale annotation
fails here rather than in a user's type checker or IDE."""

import ast
import importlib
import importlib.util
import inspect
import pkgutil
import typing


def _modules():
    """Every module of the package; its subpackages mapped from top-level folders included."""
    packages = ["diffalign", "diffalign.pipelines", "diffalign.rewards", "diffalign.train"]
    names = set(packages)
    for package in packages:
        path = importlib.import_module(package).__path__
        names |= {info.name for info in pkgutil.walk_packages(path, f"{package}.")}
    for name in sorted(names):
        if not name.endswith("__main__"):
            yield importlib.import_module(name)


def _type_checking_names(module) -> dict:
    """The module's globals plus what its ``if TYPE_CHECKING:`` block imports."""
    namespace = dict(vars(module))
    tree = ast.parse(inspect.getsource(module))
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            body = ast.Module(body=node.body, type_ignores=[])
            exec(compile(body, module.__file__, "exec"), namespace)
    return namespace


def _public_functions(module):
    for name, value in vars(module).items():
        if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(value):
            yield name, value
        elif inspect.isclass(value):
            for attribute, member in vars(value).items():
                member = getattr(member, "__func__", member)  # class and static methods
                if inspect.isfunction(member):
                    yield f"{name}.{attribute}", member


def unresolved_hints(module) -> list[str]:
    """``module.function: error`` for each public function whose hints do not resolve."""
    namespace = _type_checking_names(module)
    failures = []
    for name, function in _public_functions(module):
        try:
            typing.get_type_hints(function, globalns=namespace)
        except Exception as error:  # noqa: BLE001 - each failure is reported
            failures.append(f"{module.__name__}.{name}: {error!r}")
    return failures


def test_every_public_signature_has_type_hints_that_resolve():
    modules = list(_modules())
    assert sum(len(list(_public_functions(module))) for module in modules) > 500
    failures = [failure for module in modules for failure in unresolved_hints(module)]
    assert not failures, "\n".join(failures)


def test_the_check_finds_a_stale_annotation_and_accepts_type_checking_imports(tmp_path):
    path = tmp_path / "example_module.py"
    path.write_text(
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from diffusers import DiffusionPipeline\n"
        "def fine(pipeline: DiffusionPipeline) -> None: ...\n"
        "class Holder:\n"
        "    def stale(self, pipeline: OldPipeline) -> None: ...\n"
    )
    spec = importlib.util.spec_from_file_location("example_module", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    failures = unresolved_hints(module)
    assert len(failures) == 1 and "Holder.stale" in failures[0] and "OldPipeline" in failures[0]
