"""Pins the public API so that changes to it are deliberate."""

from __future__ import annotations

import pathlib

import tether
from tether import activity, client, testing, worker, workflow


def test_top_level_exports() -> None:
    assert sorted(tether.__all__) == sorted(
        [
            "ActivityError",
            "ApplicationError",
            "ChildWorkflowError",
            "Client",
            "FailureError",
            "HistoryEvent",
            "InvalidArgumentError",
            "NoWorkerResponseError",
            "NondeterminismError",
            "PayloadConverter",
            "PayloadError",
            "QueryFailedError",
            "RetryPolicy",
            "StaleTaskError",
            "StoreError",
            "TetherError",
            "TimeoutFailure",
            "UnknownWorkflowTypeError",
            "UpdateFailedError",
            "Worker",
            "WorkflowAlreadyStartedError",
            "WorkflowDescription",
            "WorkflowFailureError",
            "WorkflowHandle",
            "WorkflowNotFoundError",
            "__version__",
            "activity",
            "workflow",
        ]
    )
    for name in tether.__all__:
        assert hasattr(tether, name), name


def test_module_exports() -> None:
    assert sorted(workflow.__all__) == [
        "BUG_EXCEPTION_TYPES",
        "WorkflowInfo",
        "all_handlers_finished",
        "continue_as_new",
        "defn",
        "deprecate_patch",
        "execute_activity",
        "execute_child_workflow",
        "in_workflow",
        "info",
        "is_cancel_requested",
        "logger",
        "now",
        "patched",
        "query",
        "random",
        "run",
        "signal",
        "sleep",
        "start_activity",
        "start_child_workflow",
        "time",
        "update",
        "upsert_search_attributes",
        "uuid4",
        "wait_condition",
    ]
    assert sorted(activity.__all__) == [
        "ActivityCancelled",
        "ActivityInfo",
        "defn",
        "heartbeat",
        "in_activity",
        "info",
    ]
    assert sorted(client.__all__) == [
        "Client",
        "HistoryEvent",
        "WorkflowDescription",
        "WorkflowHandle",
    ]
    assert worker.__all__ == ["Worker"]
    assert sorted(testing.__all__) == ["ActivityEnvironment", "WorkflowEnvironment", "replay"]


def test_public_modules_do_not_import_the_store_or_worker_engine() -> None:
    """Layering: public API -> runtime -> store. Workflow and activity code never sees them."""
    import ast

    root = pathlib.Path(tether.__file__).parent
    for name in ("workflow.py", "activity.py", "exceptions.py", "common.py", "converter.py"):
        tree = ast.parse((root / name).read_text())
        imported = [
            node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
        ]
        assert not [
            m for m in imported if m.startswith(("tether._store", "tether._runtime.engine"))
        ], name
    for path in (root / "_store").glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in imported if m.startswith("tether._runtime")], path.name


def test_the_sql_store_layers_import_only_the_layers_below() -> None:
    """``SqlStore`` is built in layers (see ``tether._store.sql``): each module may use
    the ones before it in this list, never one after it."""
    import ast

    layers = [
        "sql_statements",
        "sql_core",
        "sql_messages",
        "sql_runs",
        "sql_workflow_tasks",
        "sql_activities",
        "sql_timers",
        "sql",
    ]
    store = pathlib.Path(tether.__file__).parent / "_store"
    assert sorted(p.stem for p in store.glob("sql*.py") if not p.stem.startswith("sqlite")) == (
        sorted(layers)
    )
    for i, layer in enumerate(layers):
        tree = ast.parse((store / f"{layer}.py").read_text())
        imported = {
            (n.module or "").rpartition(".")[2]
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("tether._store.sql")
        }
        assert imported <= set(layers[:i]), (layer, imported - set(layers[:i]))


def test_the_package_is_marked_typed_for_its_users(tmp_path: pathlib.Path) -> None:
    """Users' type checkers read tether's annotations (PEP 561 ``py.typed``) instead of
    treating it as untyped: a mistyped call in user code is caught."""
    assert (pathlib.Path(tether.__file__).parent / "py.typed").is_file()
    user = tmp_path / "user_code.py"
    user.write_text(
        "from tether import RetryPolicy, workflow\n"
        "\n"
        "policy = RetryPolicy(maximum_attempts='three')\n"
        "now: float = workflow.now()\n"
    )
    from mypy import api

    out, _, status = api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(user)]
    )
    assert "import-untyped" not in out and "missing library stubs" not in out, out
    assert status == 1, out  # both mistakes are found
    assert 'Argument "maximum_attempts" to "RetryPolicy" has incompatible type "str"' in out
    assert 'expression has type "datetime", variable has type "float"' in out
