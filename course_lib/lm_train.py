"""Training a GPT: the loop of chapter 10, with what makes it fast and safe to interrupt.

One optimiser step (:meth:`Trainer.train_step`):

1. set the learning rate from the schedule (:func:`lr_at`: linear warm-up, then cosine decay);
2. ``grad_accum`` times: draw a batch, forward under autocast (bf16 on CUDA, fp32 on the CPU),
   backward the loss divided by ``grad_accum`` — gradients add up, so the step sees the mean
   over ``batch_size * grad_accum`` sequences without holding them in memory at once;
3. clip the global gradient norm, then AdamW (:func:`make_optimizer`: weight decay on matrices
   only; the fused CUDA kernel on GPUs).

Speed comes from what the loop does *not* do: it never asks the GPU for a number between log
points (``loss.item()`` would make the CPU wait for the GPU every step), so the CPU queues the
next step's work while the GPU runs the current one. ``torch.compile`` is opt-in
(``TrainConfig(compile=True)``): it fuses the small element-wise kernels, after a compile of a
minute or so.

Checkpoints (:meth:`Trainer.save` / :meth:`Trainer.load`) hold the weights in safetensors and
everything else a run needs to continue *exactly* as if never stopped: optimiser state, step,
the state of the batch sampler and of the dropout RNG, and the history.

Data parallelism: start the same script with ``torchrun --nproc_per_node N``; call
:func:`init_distributed` (gloo on CPU, NCCL on GPUs) and pass its result to the trainer. Each
process draws its own batches; DDP averages the gradients during backward, so every process
applies the same update.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from course_lib.device import autocast_dtype, get_device
from course_lib.gpt import GPT, GPTConfig, mfu, peak_bf16_flops
from course_lib.lm_data import iter_blocks
from course_lib.tokenizers import Tokenizer, load_tokenizer

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
METRICS_FILE = "metrics.json"
PRETRAINED_ROOT = Path(__file__).resolve().parent / "checkpoints"
PRETRAINED_NAME = "shakespeare-gpt"


class BatchSource(Protocol):
    """What the trainer needs from data: :class:`course_lib.lm_data.LMData` is one."""

    def get_batch(self, split: str, batch_size: int, block_size: int,
                  generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class TrainConfig:
    """Hyper-parameters of a run. ``batch_size`` is per process and per micro-batch: one
    optimiser step sees ``batch_size * grad_accum * world_size`` sequences."""

    max_steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    block_size: int | None = None  # default: the model's block_size
    lr: float = 1e-3
    min_lr: float | None = None  # default: lr / 10
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 turns clipping off
    eval_every: int = 250  # 0: evaluate only at the end
    eval_batches: int = 20
    log_every: int = 10
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "fp32", "bf16", "fp16"
    compile: bool = False
    # torch.compile's mode: "default", or "max-autotune" (benchmarks matrix-product kernels and
    # captures CUDA graphs: slower to compile, sometimes faster to run), "reduce-overhead", ...
    compile_mode: str = "default"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_steps < 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("max_steps >= 0, batch_size >= 1 and grad_accum >= 1 are required")
        if self.warmup_steps < 0 or self.lr <= 0:
            raise ValueError("warmup_steps must be >= 0 and lr > 0")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def lr_at(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate at optimiser step ``step`` (counted from 0).

    Warm-up: ``max_lr * (step + 1) / warmup_steps`` — Adam's early updates are large and noisy
    (its second-moment estimate is still poor), so we start small. Then a cosine from ``max_lr``
    down to ``min_lr`` at ``max_steps``, and ``min_lr`` after that.
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def evaluate_batches(model: nn.Module, batches) -> float:
    """Mean of ``model(x, y)``'s loss over ``batches`` (a list of ``(x, y)``), in eval mode and
    without gradients; the model goes back to train mode afterwards."""
    model.eval()
    with torch.no_grad():
        total = sum(float(model(x, y)[1]) for x, y in batches)
    model.train()
    return total / len(batches)


def train_loop(model: nn.Module, optimizer: torch.optim.Optimizer,
               get_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], steps: int, max_lr: float,
               min_lr: float, warmup_steps: int, accum_steps: int = 1, grad_clip: float = 1.0,
               val_batches=(), eval_every: int = 0) -> dict[str, list]:
    """The training loop of chapter 10, written out with every choice explicit (the exercise's
    reference; :class:`Trainer` is the same loop with checkpoints, mixed precision and logging).

    ``model(x, y)`` returns ``(logits, mean loss)``; ``get_batch()`` returns the next training
    micro-batch ``(x, y)`` (all randomness of the data lives in it, so the run is deterministic
    when it is). Step ``s = 0 .. steps - 1``:

    1. every parameter group's learning rate is :func:`lr_at` ``(s, max_lr, min_lr, warmup_steps, steps)``;
    2. the gradients are cleared, then for ``accum_steps`` micro-batches ``get_batch()`` is called
       and ``loss / accum_steps`` is back-propagated (gradients add up to the mean's);
    3. if ``grad_clip > 0`` the global norm of all the gradients is clipped to ``grad_clip``;
    4. ``optimizer.step()``; the step's training loss is the mean of its micro-batch losses;
    5. after step ``s + 1`` that is a multiple of ``eval_every`` (``eval_every > 0``), and after the
       last step, the model is evaluated on ``val_batches`` (:func:`evaluate_batches`) when given.

    Returns ``{"lr": [...], "train_loss": [...]}`` (one float per step) and ``"eval_step"`` /
    ``"val_loss"`` (the step counts after which it evaluated, and the losses). The gradients are
    cleared at the end.
    """
    history: dict[str, list] = {"lr": [], "train_loss": [], "eval_step": [], "val_loss": []}
    model.train()
    for step in range(steps):
        lr = lr_at(step, max_lr, min_lr, warmup_steps, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(accum_steps):
            x, y = get_batch()
            loss = model(x, y)[1] / accum_steps
            loss.backward()
            total += loss.item()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        history["lr"].append(lr)
        history["train_loss"].append(total)
        done = step + 1
        if val_batches and ((eval_every > 0 and done % eval_every == 0) or done == steps):
            history["eval_step"].append(done)
            history["val_loss"].append(evaluate_batches(model, val_batches))
    optimizer.zero_grad(set_to_none=True)
    return history


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                   betas: tuple[float, float] = (0.9, 0.95),
                   device: torch.device | str | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices (linear weights, embeddings) only.

    Decay pulls weights towards zero; that regularises the matrices, but on a bias or a
    LayerNorm gain it would only fight the scale the network needs. On CUDA the fused kernel
    updates every tensor in one launch instead of several per tensor.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    device = torch.device(device) if device is not None else next(model.parameters()).device
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **extra)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: ``auto`` is bf16 on CUDA (fp16 on GPUs without bf16), fp32 elsewhere."""
    if precision == "auto":
        return autocast_dtype(device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError("fp16 training needs a CUDA GPU (it relies on a gradient scaler there)")
    return dtype


def _grad_scaler(device: torch.device, enabled: bool):
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler(device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled and device.type == "cuda")


# ---------------------------------------------------------------------------------------------
# Distributed
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in a data-parallel run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None, device_type: str | None = None) -> DistributedContext | None:
    """Join the process group that ``torchrun`` set up (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT`` in the environment); ``None`` when not launched that way.

    NCCL when the processes have GPUs (one each, by local rank), gloo on the CPU.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = (device_type or get_device().type) == "cuda"
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), rank=rank, world_size=world)
    return DistributedContext(rank, world, local_rank, device)


# ---------------------------------------------------------------------------------------------
# History
# ---------------------------------------------------------------------------------------------


@dataclass
class LMHistory:
    """What a run records: the loss and learning rate of every step, and each evaluation."""

    step_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    tokens_seen: list[int] = field(default_factory=list)
    elapsed_s: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)  # one value per log interval

    @property
    def val_perplexity(self) -> list[float]:
        """``exp(val_loss)``: the model is as unsure as a uniform choice among that many tokens."""
        return [math.exp(v) for v in self.val_loss]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> LMHistory:
        return cls(**values)


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


class Trainer:
    """Trains a :class:`~course_lib.gpt.GPT` on a :class:`BatchSource`.

    ``trainer.fit()`` runs to ``config.max_steps``; call it again after raising ``max_steps``,
    or after :meth:`load`, to continue.
    """

    def __init__(self, model: GPT, data: BatchSource, config: TrainConfig | None = None,
                 device: torch.device | str | None = None,
                 distributed: DistributedContext | None = None) -> None:
        self.config = config or TrainConfig()
        self.distributed = distributed
        if distributed is not None:
            self.device = distributed.device
        else:
            self.device = torch.device(device) if device is not None else get_device()
        self.rank = distributed.rank if distributed else 0
        self.world_size = distributed.world_size if distributed else 1
        self.data = data
        self.raw_model = model.to(self.device)
        self.block_size = self.config.block_size or model.config.block_size
        if self.block_size > model.config.block_size:
            raise ValueError(f"block_size {self.block_size} > the model's {model.config.block_size}")
        self.dtype = resolve_precision(self.config.precision, self.device)
        if self.device.type == "cuda":
            # fp32 matrix products (outside autocast) on tensor cores with TF32: ~8x faster, and
            # the 10-bit mantissa is plenty for training.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.optimizer = make_optimizer(model, self.config.lr, self.config.weight_decay,
                                        (self.config.beta1, self.config.beta2), self.device)
        # fp16 overflows without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = _grad_scaler(self.device, enabled=self.dtype == torch.float16)
        self.step = 0
        self.history = LMHistory()
        self.generator = torch.Generator().manual_seed(self.config.seed * 1000 + self.rank)
        torch.manual_seed(self.config.seed * 1000 + self.rank)  # dropout masks
        # What the training step calls: the model, compiled if asked, wrapped by DDP in a
        # distributed run (compile first, then DDP, as nanoGPT does). Saving and evaluation use
        # ``raw_model``, the plain module underneath.
        self.model: nn.Module = model
        if self.config.compile:
            self.model = torch.compile(self.model, mode=self.config.compile_mode)
        if distributed is not None:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self._pending_losses: list[torch.Tensor] = []  # device tensors not yet read back
        self._pending_lrs: list[float] = []
        self._elapsed = 0.0

    # -- properties ----------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tokens_per_step(self) -> int:
        c = self.config
        return c.batch_size * c.grad_accum * self.block_size * self.world_size

    @property
    def min_lr(self) -> float:
        return self.config.min_lr if self.config.min_lr is not None else self.config.lr / 10

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    # -- one step ------------------------------------------------------------------------------
    def forward_backward(self) -> torch.Tensor:
        """Accumulate the gradients of one optimiser step; return its mean loss (on the device,
        not read back). In a distributed run, gradients are averaged on the last micro-batch."""
        c = self.config
        total = torch.zeros((), device=self.device)
        self.model.train()
        for micro in range(c.grad_accum):
            x, y = self.data.get_batch("train", c.batch_size, self.block_size, self.generator, self.device)
            if self.distributed is not None:
                # All-reduce once per step, not once per micro-batch.
                self.model.require_backward_grad_sync = micro == c.grad_accum - 1
            with self.autocast():
                _, loss = self.model(x, y)
            loss = loss / c.grad_accum
            self.scaler.scale(loss).backward()
            total += loss.detach()
        return total

    def optimizer_step(self) -> None:
        """Clip, update with the scheduled learning rate, clear the gradients, count the step."""
        c = self.config
        lr = lr_at(self.step, c.lr, self.min_lr, c.warmup_steps, c.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if c.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.raw_model.parameters(), c.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self._pending_lrs.append(lr)
        self.step += 1

    def train_step(self) -> torch.Tensor:
        """One optimiser step; returns its loss as a device tensor."""
        loss = self.forward_backward()
        self.optimizer_step()
        self._pending_losses.append(loss)
        return loss

    def _flush(self) -> list[float]:
        """Read the pending step losses back from the device in one transfer."""
        if not self._pending_losses:
            return []
        values = torch.stack(self._pending_losses).tolist()
        if self.distributed is not None:
            tensor = torch.tensor(values, device=self.device)
            dist.all_reduce(tensor)
            values = (tensor / self.world_size).tolist()
        self.history.step_loss.extend(values)
        self.history.lr.extend(self._pending_lrs)
        self._pending_losses, self._pending_lrs = [], []
        return values

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str = "val", batches: int | None = None) -> float:
        """Mean loss over ``batches`` batches of ``split``. They are drawn with a fixed seed, so
        every evaluation of a run scores the same text and the curve is not sampling noise."""
        n = batches or self.config.eval_batches
        generator = torch.Generator().manual_seed(10_000 + self.rank)
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for _ in range(n):
            x, y = self.data.get_batch(split, self.config.batch_size, self.block_size, generator, self.device)
            with self.autocast():
                _, loss = self.raw_model(x, y)
            total += loss.float()
        self.model.train()
        if self.distributed is not None:
            dist.all_reduce(total)
            total /= self.world_size
        return total.item() / n

    def _record_eval(self) -> dict[str, float]:
        result = {"step": self.step, "train_loss": self.evaluate("train"), "val_loss": self.evaluate("val")}
        self.history.eval_step.append(self.step)
        self.history.train_loss.append(result["train_loss"])
        self.history.val_loss.append(result["val_loss"])
        self.history.tokens_seen.append(self.step * self.tokens_per_step)
        self.history.elapsed_s.append(round(self._elapsed, 3))
        return result

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, steps: int | None = None, progress: bool = True,
            callback: Callable[[Trainer, dict[str, float]], None] | None = None) -> LMHistory:
        """Train until ``config.max_steps`` (or for at most ``steps`` more steps): log every
        ``log_every`` steps (loss, tokens/s in the progress bar), evaluate every ``eval_every``
        steps and at ``max_steps``. ``callback(trainer, eval_result)`` runs after each evaluation
        (e.g. to keep the best checkpoint). The schedule always follows ``max_steps``, so a run cut
        into pieces by ``steps`` is the same run."""
        c = self.config
        stop = c.max_steps if steps is None else min(c.max_steps, self.step + steps)
        remaining = max(0, stop - self.step)
        bar = tqdm(total=remaining, disable=not (progress and self.is_main), desc="training",
                   leave=False, unit="step")
        self._sync()
        start = last_time = time.perf_counter()
        last_step = self.step
        elapsed_before = self._elapsed
        while self.step < stop:
            self.train_step()
            at_log = self.step % c.log_every == 0 or self.step == stop
            at_eval = (c.eval_every and self.step % c.eval_every == 0) or self.step == c.max_steps
            if at_log or at_eval:
                losses = self._flush()  # the one host sync of the interval
                now = time.perf_counter()
                self._elapsed = elapsed_before + now - start
                rate = (self.step - last_step) * self.tokens_per_step / max(now - last_time, 1e-9)
                self.history.tokens_per_s.append(rate)
                bar.update(self.step - last_step)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rate:,.0f}")
                last_time, last_step = now, self.step
            if at_eval:
                result = self._record_eval()
                if self.is_main:
                    bar.set_postfix(loss=f"{result['train_loss']:.3f}", val=f"{result['val_loss']:.3f}")
                if callback is not None:
                    callback(self, result)
                last_time = time.perf_counter()  # evaluation time is not training throughput
        bar.close()
        return self.history

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def mfu(self, tokens_per_s: float) -> float | None:
        """MFU of a measured training rate (all processes together), ``None`` off the table."""
        peak = peak_bf16_flops(self.device)
        return mfu(tokens_per_s, self.raw_model.flops_per_token(self.block_size), peak, self.world_size)

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path | None:
        """Write a checkpoint to ``folder`` (only process 0 writes; every process must call it)."""
        self._flush()
        states = {"generator": self.generator.get_state(), "torch": torch.get_rng_state(),
                  "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        if self.distributed is not None:
            gathered: list = [None] * self.world_size
            dist.all_gather_object(gathered, states)
        else:
            gathered = [states]
        if not self.is_main:
            return None
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_weights(self.raw_model, folder / WEIGHTS_FILE)
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "rng": gathered,
                 "history": self.history.to_dict(), "elapsed_s": self._elapsed,
                 "train_config": self.config.to_dict()}
        tmp = folder / f"{STATE_FILE}.tmp"
        torch.save(state, tmp)
        tmp.replace(folder / STATE_FILE)
        write_json(folder / CONFIG_FILE, {"model": self.raw_model.config.to_dict(),
                                          "train": self.config.to_dict()})
        return folder

    def load(self, folder: str | Path) -> Trainer:
        """Restore a checkpoint written by :meth:`save` into this trainer (same model shape and
        process count); the next :meth:`fit` continues where the saved run stopped."""
        folder = Path(folder)
        load_weights(self.raw_model, folder / WEIGHTS_FILE)
        state = torch.load(folder / STATE_FILE, map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.history = LMHistory.from_dict(state["history"])
        self._elapsed = state["elapsed_s"]
        rng = state["rng"]
        if len(rng) != self.world_size:
            raise ValueError(f"checkpoint was written by {len(rng)} processes; this run has "
                             f"{self.world_size}: batches could not continue exactly")
        mine = rng[self.rank]
        self.generator.set_state(mine["generator"].cpu())
        torch.set_rng_state(mine["torch"].cpu())
        if mine["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"].cpu(), self.device)
        return self


# ---------------------------------------------------------------------------------------------
# Weights on disk
# ---------------------------------------------------------------------------------------------


def write_json(path: Path, values: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def save_weights(model: GPT, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """The model's weights as a safetensors file, optionally cast to ``dtype`` (e.g. bf16 to
    halve the file). The tied head is stored once, as the token embedding."""
    from safetensors.torch import save_file

    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.lm_head.weight is model.wte.weight:
            continue
        tensor = tensor.detach()
        tensors[name] = (tensor.to(dtype) if dtype is not None else tensor).contiguous().cpu()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"config": json.dumps(model.config.to_dict())})
    tmp.chmod(0o644)  # safetensors writes owner-only; a model file is for everyone to read
    tmp.replace(path)
    return path


def load_weights(model: GPT, path: str | Path) -> GPT:
    """Load a file written by :func:`save_weights` into ``model`` (cast to the model's dtype)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    reference = model.state_dict()
    tensors = {k: v.to(reference[k].dtype) if k in reference else v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise ValueError(f"weights in {path} do not fit this model: missing {missing}, "
                         f"unexpected {unexpected}")
    return model


def export_model(model: GPT, tokenizer: Tokenizer, folder: str | Path, metrics: dict,
                 dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write what a chapter needs to use a trained model: weights (in ``dtype``), the model
    config, the tokenizer, and ``metrics.json`` (how it was made and how good it is)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(model, folder / WEIGHTS_FILE, dtype=dtype)
    write_json(folder / CONFIG_FILE, model.config.to_dict())
    tokenizer.save(folder / TOKENIZER_FILE)
    write_json(folder / METRICS_FILE, metrics)
    return folder


def load_model(folder: str | Path, device: torch.device | str | None = None
               ) -> tuple[GPT, Tokenizer, dict]:
    """Load a folder written by :func:`export_model`: ``(model in eval mode, tokenizer, metrics)``."""
    folder = Path(folder)
    config = GPTConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")))
    model = GPT(config)
    load_weights(model, folder / WEIGHTS_FILE)
    model.to(torch.device(device) if device is not None else get_device()).eval()
    tokenizer = load_tokenizer(folder / TOKENIZER_FILE)
    metrics_path = folder / METRICS_FILE
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.exists() else {}
    return model, tokenizer, metrics


def load_pretrained(name: str = PRETRAINED_NAME, device: torch.device | str | None = None
                    ) -> tuple[GPT, Tokenizer, dict]:
    """The course's pretrained Shakespeare GPT: ``(model, tokenizer, metrics)``.

    Raises:
        FileNotFoundError: when the checkpoint is not in this copy of the course, saying how to
            get a model instead.
    """
    folder = PRETRAINED_ROOT / name
    if not (folder / WEIGHTS_FILE).exists():
        raise FileNotFoundError(
            f"The pretrained checkpoint {name!r} is not in this copy of the course "
            f"(looked for {folder / WEIGHTS_FILE}).\n"
            "Either train a model yourself in this chapter (set the option to train instead of "
            "loading; on a laptop CPU the small recipe takes a few minutes), or create the "
            "checkpoint on a machine with a GPU from the course folder with\n"
            "    .venv/bin/python scripts/pretrain_gpt.py --preset gpu\n"
            "which writes it to exactly that folder.")
    return load_model(folder, device)


@torch.no_grad()
def exact_loss(model: GPT, tokens, block_size: int | None = None, batch_size: int = 32,
               device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> float:
    """Mean next-token loss over *every* token of ``tokens`` (consecutive windows), not a sample."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    block_size = block_size or model.config.block_size
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for x, y in iter_blocks(tokens, batch_size, block_size, device):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                _, loss = model(x, y)
            total += loss.item() * y.numel()
            count += y.numel()
    finally:
        model.train(was_training)
    return total / max(count, 1)
