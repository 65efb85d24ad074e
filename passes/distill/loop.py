"""The training loop: teacher frozen, student trained on ``α·KD + β·feature + γ·CE``.

Optimizer (AdamW or SGD with Nesterov momentum), cosine or constant learning rate per
epoch, early stopping on the validation metric (accuracy against the labels, or top-1
agreement with the teacher when the data has no labels) with the best weights restored,
a rich progress bar on terminals, a checkpoint after every epoch and resume from it, and
the network-slimming L1 penalty on BatchNorm scales.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the same loop runs with DistributedDataParallel —
gloo on CPU, nccl on GPU — without code changes: every process reads the same batches and
trains on its share of each, so the global batch is the loader's batch and the result
matches a single-process run. BatchNorm layers in training mode normalise with their
process's share of the batch, as with plain DDP; their running statistics are averaged over
the processes after every epoch, so all processes validate and return the same model.
"""

from __future__ import annotations

import atexit
import copy
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.utils import _pytree as pytree
from torch.utils.data.distributed import DistributedSampler

from graphopt import (
    GraphoptError,
    LossFn,
    LossInputs,
    input_names,
    primary_output,
    run_model,
    split_batch,
)
from graphopt.errors import first_line

from .losses import adapter, ce_loss, feature_loss, kd_loss
from .options import DistillOptions
from .pairing import Pair, pair_nodes, tap

__all__ = ["FitResult", "evaluate", "fit", "logits_of"]

CHECKPOINT_FILE = "distill.pt"


@dataclass
class FitResult:
    """What a training run did: epochs, metric before/after, the teacher's, per-epoch log."""

    metric: str
    teacher: float | None
    before: float | None
    after: float | None
    epochs: int
    best_epoch: int
    pairs: list[Pair] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)


class _Student(nn.Module):
    """The tapped student and the adapters of its feature pairs, trained together."""

    def __init__(self, net: fx.GraphModule, adapters: Sequence[nn.Module]) -> None:
        super().__init__()
        self.net = net
        self.adapters = nn.ModuleList(adapters)

    def forward(self, *inputs: Any) -> tuple[Any, tuple[torch.Tensor, ...]]:
        out, feats = self.net(*inputs)
        return out, tuple(a(f) for a, f in zip(self.adapters, feats, strict=True))


def logits_of(out: Any) -> torch.Tensor:
    """The model output's logits (:func:`graphopt.primary_output`), or else its first
    floating-point tensor: what KD and CE compare."""
    primary = primary_output(out)
    if primary is not None and primary.is_floating_point():
        return primary
    for leaf in pytree.tree_leaves(out):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    raise GraphoptError("the model's output holds no floating-point tensor to distill")


def _to(obj: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, obj)


class _Dist:
    """Rank and world size; under torchrun, the process group is started on first use.

    The group then lives until the process exits: a later ``distill`` in the same process
    reuses it (tearing a gloo group down and setting it up again races between processes).
    """

    def __init__(self) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
                self.rank, self.world = 0, 1
                return
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            atexit.register(_end_process_group)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def shard(self, batch: Any, loader: Any) -> Any:
        """This process's share of a batch (all of it when the loader already shards)."""
        if self.world == 1 or isinstance(getattr(loader, "sampler", None), DistributedSampler):
            return batch
        return pytree.tree_map(
            lambda t: t.tensor_split(self.world)[self.rank] if isinstance(t, torch.Tensor) else t,
            batch,
        )

    def average_buffers(self, module: nn.Module) -> None:
        """Average floating-point buffers (BatchNorm statistics) over the processes, so every
        process validates, keeps and returns the same model."""
        if self.world == 1:
            return
        for buf in module.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                buf.div_(self.world)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _end_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _device(choice: str, rank_dist: _Dist) -> torch.device:
    if choice != "auto":
        return torch.device(choice)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _modes(module: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in module.modules()]


def _restore(modes: list[tuple[nn.Module, bool]]) -> None:
    for m, mode in modes:
        m.training = mode


@torch.no_grad()
def evaluate(
    student: Callable[..., Any],
    teacher: Callable[..., Any] | None,
    batches: Iterable[Any],
    inputs: int | Sequence[str],
    device: torch.device,
) -> tuple[str, float]:
    """Top-1 accuracy against the labels (``"accuracy"``), or, for batches without labels,
    top-1 agreement with the teacher (``"agreement"``); ``inputs`` is the number or the
    names of the models' inputs (see :func:`graphopt.split_batch`). Both models must be in
    eval mode."""
    hits = total = 0
    kind = "accuracy"
    for batch in batches:
        model_inputs, target = split_batch(_to(batch, device), inputs)
        pred = logits_of(student(*model_inputs))
        if target is None:
            if teacher is None:
                raise GraphoptError("validation batches carry no labels and there is no teacher")
            kind = "agreement"
            target = logits_of(teacher(*model_inputs)).argmax(1)
        elif target.dim() == pred.dim():  # class probabilities
            target = target.argmax(1)
        hits += int((pred.argmax(1) == target).sum())
        total += target.numel()
    return kind, hits / max(total, 1)


def _optimizer(params: list[nn.Parameter], o: DistillOptions) -> torch.optim.Optimizer:
    if o.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=o.lr, momentum=0.9, nesterov=True, weight_decay=o.weight_decay
        )
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


def _first_batch(train: Iterable[Any]) -> Any:
    if iter(train) is train:
        raise GraphoptError(
            "distill's training data is a one-shot iterator; give something it can read once "
            "per epoch, such as a DataLoader or a list of batches"
        )
    for batch in train:
        return batch
    raise GraphoptError("distill's training data is empty; give at least one batch")


class _Checkpoint:
    """``distill.pt`` in the checkpoint folder: written atomically by rank 0 every epoch."""

    def __init__(self, folder: str | None, rank: int) -> None:
        self.path = os.path.join(folder, CHECKPOINT_FILE) if folder else None
        self.rank = rank
        if folder and rank == 0:
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as exc:
                raise GraphoptError(
                    f"cannot create the checkpoint folder '{folder}' ({exc.strerror}); "
                    "give a writable checkpoint=PATH"
                ) from None

    def save(self, state: dict[str, Any]) -> None:
        if self.path is None or self.rank != 0:
            return
        tmp = self.path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def load(self, model: nn.Module) -> dict[str, Any] | None:
        if self.path is None or not os.path.exists(self.path):
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
        except Exception as exc:
            raise GraphoptError(
                f"checkpoint '{self.path}' does not fit this student ({str(exc).splitlines()[0]}); "
                "delete it or give another checkpoint folder"
            ) from None
        return state


def _adapters(
    student: fx.GraphModule,
    teacher: fx.GraphModule,
    pairs: list[Pair],
    inputs: tuple[Any, ...],
    notes: list[str],
) -> tuple[list[Pair], list[nn.Module], list[float]]:
    """Adapters and loss scales of the pairs, from one forward pass; drop unfit pairs."""
    with torch.no_grad():
        _, s_feats = tap(student, [p.student for p in pairs])(*inputs)
        _, t_feats = tap(teacher, [p.teacher for p in pairs])(*inputs)
    kept, adapters, scales = [], [], []
    for p, s, t in zip(pairs, s_feats, t_feats, strict=True):
        if not (isinstance(s, torch.Tensor) and isinstance(t, torch.Tensor)):
            notes.append(f"feature {p.teacher}: not a tensor, not distilled")
            continue
        a = adapter(s.shape, t.shape)
        if a is None or not s.is_floating_point():
            notes.append(
                f"feature {p.teacher}: student shape {tuple(s.shape)} cannot be mapped to "
                f"the teacher's {tuple(t.shape)}, not distilled"
            )
            continue
        kept.append(p)
        adapters.append(a.to(s.device))
        scales.append(max(float(t.float().pow(2).mean()), 1e-12))
    return kept, adapters, scales


def fit(
    student: fx.GraphModule,
    teacher: fx.GraphModule,
    train: Iterable[Any],
    val: Iterable[Any] | None,
    o: DistillOptions,
    *,
    extra_losses: Sequence[tuple[LossFn, float]] = (),
    console: Any = None,
) -> FitResult:
    """Train ``student`` (in place) towards the frozen ``teacher`` with the ``distill``
    pass's options ``o``; see the module docstring."""
    ranks = _Dist()
    device = _device(o.device, ranks)
    home = next((p.device for p in student.parameters()), torch.device("cpu"))
    student_modes, teacher_modes = _modes(student), _modes(teacher)
    t_home = next((p.device for p in teacher.parameters()), torch.device("cpu"))
    if t_home != device:
        teacher = copy.deepcopy(teacher).to(device)
    try:
        student.to(device)
        teacher.eval()
        run = _Run(student, teacher, train, val, o, extra_losses, ranks, device)
        return run.train(console)
    finally:
        student.to(home)
        _restore(student_modes)
        _restore(teacher_modes)


class _Run:
    """One training run, phase by phase: pair features and build the models (here), measure
    the starting point or resume (:meth:`_start`), train epoch by epoch keeping the best
    weights (:meth:`_epoch`, :meth:`_keep_best`), and restore the best (:meth:`train`)."""

    def __init__(
        self,
        student: fx.GraphModule,
        teacher: fx.GraphModule,
        train: Iterable[Any],
        val: Iterable[Any] | None,
        o: DistillOptions,
        extra_losses: Sequence[tuple[LossFn, float]],
        ranks: _Dist,
        device: torch.device,
    ) -> None:
        torch.manual_seed(o.seed)
        self.student, self.teacher, self.train_data, self.val = student, teacher, train, val
        self.o, self.extra_losses, self.ranks, self.device = o, extra_losses, ranks, device
        self.names = input_names(student)
        self.notes: list[str] = []
        first_inputs, first_target = split_batch(_to(_first_batch(train), device), self.names)
        _check_runs(student, teacher, first_inputs)
        self.pairs, adapters, self.scales = self._pair_features(first_inputs)
        if o.gamma > 0 and first_target is None:
            self.notes.append("the batches carry no labels: γ (cross-entropy) is not used")
        self.model = _Student(tap(student, [p.student for p in self.pairs]), adapters).to(device)
        self.t_net = tap(teacher, [p.teacher for p in self.pairs])
        self.t_net.eval()
        self.train_model: nn.Module = self.model
        if ranks.world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        self.opt = _optimizer([p for p in self.model.parameters() if p.requires_grad], o)
        self.sched = (
            torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=max(o.epochs, 1))
            if o.schedule == "cosine"
            else None
        )
        self.bns = [
            m for m in student.modules() if isinstance(m, _BatchNorm) and m.weight is not None
        ]
        self.masks = _zero_masks(student) if o.keep_zeros else []
        if self.masks:
            zeros = sum(int((~m).sum()) for _, m in self.masks)
            self.notes.append(f"kept {zeros} zero weights in {len(self.masks)} tensors at zero")
        self.ckpt = _Checkpoint(o.checkpoint, ranks.rank)

    def _pair_features(
        self, inputs: tuple[Any, ...]
    ) -> tuple[list[Pair], list[nn.Module], list[float]]:
        """The feature pairs of the β loss, their adapters and loss scales (none if β = 0)."""
        if self.o.beta <= 0:
            return [], [], []
        pairs, missing = pair_nodes(self.teacher, self.student, self.o.features)
        for name in missing:
            self.notes.append(f"feature {name}: no student node stands for it, not distilled")
        pairs, adapters, scales = _adapters(self.student, self.teacher, pairs, inputs, self.notes)
        if not pairs:
            self.notes.append("no feature pairs: β (feature loss) is not used")
        return pairs, adapters, scales

    def _validate(self) -> tuple[str, float] | None:
        if self.val is None:
            return None
        self.student.eval()
        return evaluate(self.student, self.teacher, self.val, self.names, self.device)

    def _start(self) -> int:
        """Measure the teacher and the untrained student, or resume from the checkpoint;
        return the first epoch to run."""
        teacher_metric = None
        if self.val:
            teacher_metric = evaluate(
                self.teacher, self.teacher, self.val, self.names, self.device
            )[1]
        start = self._validate()
        self.result = FitResult(
            metric=start[0] if start else "none",
            teacher=teacher_metric,
            before=start[1] if start else None,
            after=start[1] if start else None,
            epochs=0,
            best_epoch=0,
            pairs=self.pairs,
            notes=self.notes,
        )
        self.best = start[1] if start else None
        self.best_state = copy.deepcopy(self.student.state_dict()) if start else None
        self.bad = 0
        state = self.ckpt.load(self.model) if self.o.resume else None
        if state is None:
            return 0
        self.opt.load_state_dict(state["optimizer"])
        if self.sched is not None and state.get("scheduler"):
            self.sched.load_state_dict(state["scheduler"])
        self.bad, self.best, self.best_state = state["bad"], state["best"], state["best_state"]
        self.result.best_epoch, self.result.history = state["best_epoch"], state["history"]
        self.notes.append(f"resumed from {self.ckpt.path} after epoch {state['epoch']}")
        return int(state["epoch"])

    def _loss(self, batch: Any) -> torch.Tensor:
        """``α·KD + β·feature + γ·CE`` + plugin losses + the BatchNorm L1 penalty."""
        o = self.o
        shard = self.ranks.shard(batch, self.train_data)
        inputs, target = split_batch(_to(shard, self.device), self.names)
        with torch.no_grad():
            t_out, t_feats = self.t_net(*inputs)
        s_out, s_feats = self.train_model(*inputs)
        s_logits, t_logits = logits_of(s_out), logits_of(t_out)
        loss = s_logits.new_zeros(())
        if o.alpha > 0:
            loss = loss + o.alpha * kd_loss(s_logits, t_logits, o.temperature)
        if o.beta > 0 and self.pairs:
            loss = loss + o.beta * feature_loss(s_feats, t_feats, self.scales)
        if o.gamma > 0 and target is not None:
            loss = loss + o.gamma * ce_loss(s_logits, target)
        if self.extra_losses:
            li = LossInputs(s_logits, t_logits, s_feats, t_feats, target, o.temperature)
            for fn, weight in self.extra_losses:
                loss = loss + weight * fn(li)
        if o.l1_bn > 0 and self.bns:
            loss = loss + o.l1_bn * sum(bn.weight.abs().sum() for bn in self.bns)
        return loss

    def _epoch(self, epoch: int, progress: Any) -> dict[str, float]:
        """Train one epoch; return its log entry (mean loss, and the validation metric)."""
        o = self.o
        self.model.train()
        if o.freeze_bn:
            for m in self.student.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        train = self.train_data
        total = len(train) if hasattr(train, "__len__") else None  # type: ignore[arg-type]
        task = progress.add_task(f"distill epoch {epoch + 1}/{o.epochs}", total=total)
        running, seen = 0.0, 0
        for batch in train:
            loss = self._loss(batch)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            with torch.no_grad():
                for p, keep in self.masks:
                    p.mul_(keep)
            running, seen = running + float(loss.detach()), seen + 1
            progress.update(task, advance=1, description=_label(epoch, o.epochs, running / seen))
        if self.sched is not None:
            self.sched.step()
        self.ranks.average_buffers(self.student)
        metric = self._validate()
        entry = {"epoch": epoch + 1, "loss": running / max(seen, 1)}
        if metric is not None:
            entry[metric[0]] = metric[1]
            self._keep_best(epoch, metric[1])
        self.result.history.append(entry)
        progress.update(task, description=_label(epoch, o.epochs, entry["loss"], metric))
        return entry

    def _keep_best(self, epoch: int, value: float) -> None:
        """Count epochs without improvement; keep the weights of the best (a tie: the
        later weights win)."""
        improved = self.best is None or value > self.best + 1e-9
        self.bad = 0 if improved else self.bad + 1
        if improved or value >= (self.best or 0.0) - 1e-9:
            self.best = value
            self.best_state = copy.deepcopy(self.student.state_dict())
            self.result.best_epoch = epoch + 1

    def _save(self, epoch: int) -> None:
        self.ckpt.save(
            {
                "epoch": epoch + 1,
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict() if self.sched is not None else None,
                "best": self.best,
                "best_state": self.best_state,
                "best_epoch": self.result.best_epoch,
                "bad": self.bad,
                "history": self.result.history,
            }
        )

    def train(self, console: Any) -> FitResult:
        """Run the remaining epochs (stopping early without progress), then restore the
        best weights."""
        o = self.o
        first_epoch = self._start()
        with _progress(console, o.progress and self.ranks.rank == 0) as progress:
            for epoch in range(first_epoch, o.epochs):
                self._epoch(epoch, progress)
                self._save(epoch)
                self.ranks.barrier()
                if o.patience > 0 and self.bad >= o.patience and epoch + 1 < o.epochs:
                    self.notes.append(
                        f"stopped early after epoch {epoch + 1}: no better "
                        f"{self.result.metric} for {o.patience} epochs"
                    )
                    break
        self.result.epochs = len(self.result.history)
        if self.best_state is not None:
            self.student.load_state_dict(self.best_state)
            self.result.after = self.best
        return self.result


def _check_runs(student: nn.Module, teacher: nn.Module, inputs: tuple[Any, ...]) -> None:
    """Refuse, in one sentence, a model that cannot run on the training batches at all (a
    program exported for one batch size, inputs of the wrong shape) before training."""
    for role, model in (("student", student), ("teacher", teacher)):
        try:
            run_model(model, inputs)
        except Exception as exc:
            shapes = [tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
            raise GraphoptError(
                f"the {role} does not run on a training batch of shape {shapes} "
                f"({first_line(exc)}); give batches the model accepts (a graph captured by "
                "torch.export whose code fixes its batch or length takes only the shape it was "
                "captured with: capture it with --input-shape matching the batches)"
            ) from None


def _zero_masks(model: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Where weight tensors (2-D and up) hold exact zeros — left by sparsify or magnitude
    pruning, never by training — the mask that keeps them zero."""
    return [
        (p, p != 0)
        for p in model.parameters()
        if p.dim() > 1 and p.requires_grad and bool((p == 0).any())
    ]


def _label(epoch: int, epochs: int, loss: float, metric: tuple[str, float] | None = None) -> str:
    text = f"distill epoch {epoch + 1}/{epochs} loss {loss:.4f}"
    if metric is not None:
        text += f" val {metric[0]} {metric[1]:.2%}"
    return text


def _progress(console: Any, enabled: bool) -> Any:
    """A rich progress bar on a terminal; silent in files, pipes and other processes."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    console = console or Console(stderr=True)
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not (enabled and console.is_terminal),
        transient=False,
    )
