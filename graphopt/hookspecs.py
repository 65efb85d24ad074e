"""The hooks a graphopt plugin may implement, one documented function each.

Every hook receives a ``register`` callback; a plugin calls it once per thing it adds.
Built-in passes, analyses and exporters are contributed through these same hooks.
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("graphopt")
hookimpl = pluggy.HookimplMarker("graphopt")

__all__ = ["hookimpl", "hookspec"]


@hookspec
def graphopt_register_passes(register: Any) -> None:
    """Contribute passes: call ``register(PassSubclass)`` for each."""


@hookspec
def graphopt_register_analyses(register: Any) -> None:
    """Contribute analyses: call ``register(name, function)``; ``function(ir)`` returns the
    analysis result, which the IR caches until a pass that does not keep it runs."""


@hookspec
def graphopt_register_exporters(register: Any) -> None:
    """Contribute output formats: call ``register(Exporter(...))`` for each."""


@hookspec
def graphopt_register_prune_criteria(register: Any) -> None:
    """Contribute channel-importance criteria to the ``prune`` pass: call
    ``register(name, function)``; ``function(CriterionInput)`` returns a ``Saliency``
    (see ``graphopt.passes.prune.importance``). Users pick it with ``prune(criterion=name)``."""


@hookspec
def graphopt_register_prune_rules(register: Any) -> None:
    """Teach the ``prune`` pass new ops: call ``register(rule)`` with an ``OpRule`` (see
    ``graphopt.passes.prune.ops``) saying how the op couples channels and how it is resized;
    ``register(rule, replace=True)`` overrides a built-in rule for the same op."""


@hookspec
def graphopt_register_commands(app: Any) -> None:
    """Contribute CLI subcommands: decorate functions with ``@app.command()`` on the given
    ``typer.Typer``; they appear beside graphopt's own commands."""


@hookspec
def graphopt_register_distill_losses(register: Any) -> None:
    """Contribute distillation losses: call ``register(name, fn)``; ``fn(inputs)`` gets a
    ``LossInputs`` (student/teacher logits and paired features, labels, temperature) and
    returns a scalar tensor. Users add it with ``distill(losses=[name:weight])``."""
