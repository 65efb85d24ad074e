"""The hooks a graphopt plugin may implement, one documented function each.

Every hook receives a ``register`` callback; a plugin calls it once per thing it adds.
Built-in passes, analyses and exporters are contributed through these same hooks. The
types named here are all importable from ``graphopt``; docs/plugins.md has a complete
plugin implementing every hook. A hook that raises contributes nothing, and the plugin is
reported as failed (named, with ``-p no:NAME``); the rest of graphopt keeps working.
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("graphopt")
hookimpl = pluggy.HookimplMarker("graphopt")

__all__ = ["hookimpl", "hookspec"]


@hookspec
def graphopt_register_passes(register: Any) -> None:
    """Contribute passes: call ``register(PassSubclass)`` for each ``graphopt.Pass``
    subclass; its ``run(ir, ctx)`` reads the pipeline's values from ``self.options``."""


@hookspec
def graphopt_register_analyses(register: Any) -> None:
    """Contribute analyses: call ``register(name, function)``; ``function(ir)`` (a
    ``graphopt.Analysis``) returns the analysis result, which the IR caches until a pass
    that does not keep it runs. Passes ask for it with ``ir.analysis(name)``."""


@hookspec
def graphopt_register_exporters(register: Any) -> None:
    """Contribute output formats: call ``register(graphopt.Exporter(...))`` for each. Its
    ``write`` gets a temporary path and must write exactly that one file (or folder, for a
    directory format), which alone is checked and moved to ``-o``."""


@hookspec
def graphopt_register_prune_criteria(register: Any) -> None:
    """Contribute channel-importance criteria to the ``prune`` pass: call
    ``register(name, function)``; ``function(graphopt.CriterionInput)`` returns a
    ``graphopt.Saliency`` (a ``graphopt.Criterion``). Users pick it with
    ``prune(criterion=name)``."""


@hookspec
def graphopt_register_prune_rules(register: Any) -> None:
    """Teach the ``prune`` pass new ops: call ``register(rule)`` with an instance of a
    subclass of the prune pass's ``OpRule`` (``from graphopt.passes.prune import OpRule``)
    saying how the op couples channels and how it is resized; ``register(rule,
    replace=True)`` overrides a built-in rule for the same op. ``graphopt plugins`` lists
    a plugin's rules by class name."""


@hookspec
def graphopt_register_commands(app: Any) -> None:
    """Contribute CLI subcommands: decorate functions with ``@app.command()`` on the given
    ``typer.Typer``; they appear beside graphopt's own commands. An exception a command
    raises is reported as the plugin's fault."""


@hookspec
def graphopt_register_distill_losses(register: Any) -> None:
    """Contribute distillation losses: call ``register(name, fn)``; ``fn(inputs)`` gets a
    ``graphopt.LossInputs`` (student/teacher logits and paired features, labels,
    temperature) and returns a scalar tensor (a ``graphopt.LossFn``). Users add it with
    ``distill(losses=[name:weight])``."""
