"""course_lib.lm_train: schedule, optimiser groups, accumulation, checkpoints that resume exactly,
exported models, and data-parallel training in two real processes (gloo)."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from course_lib import lm_train
from course_lib.gpt import GPT, GPTConfig
from course_lib.lm_data import LMData
from course_lib.lm_train import (
    LMHistory,
    TrainConfig,
    Trainer,
    exact_loss,
    export_model,
    init_distributed,
    load_model,
    load_pretrained,
    load_weights,
    lr_at,
    make_optimizer,
    resolve_precision,
    save_weights,
    train_loop,
)
from course_lib.tokenizers import CharTokenizer

VOCAB = 24


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(seed: int = 0, dropout: float = 0.0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=dropout))


def pattern_data(n: int = 5000, seed: int = 0) -> LMData:
    """Tokens with structure to learn: runs that count upwards, restarting at random."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros(n, dtype=np.uint16)
    for i in range(1, n):
        tokens[i] = rng.integers(VOCAB) if rng.random() < 0.1 else (tokens[i - 1] + 1) % VOCAB
    tokenizer = CharTokenizer([chr(65 + i) for i in range(VOCAB)])
    split = int(0.9 * n)
    return LMData(tokenizer, tokens[:split], tokens[split:])


class FixedBatches:
    """Serves the given (x, y) micro-batches in order, again and again."""

    def __init__(self, batches):
        self.batches = batches
        self.calls = 0

    def get_batch(self, split, batch_size, block_size, generator=None, device="cpu"):
        x, y = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        return x.to(device), y.to(device)


def fixed_batches(n_micro: int, rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(VOCAB, (n_micro, rows, 17), generator=g)
    return [(ids[i, :, :-1], ids[i, :, 1:]) for i in range(n_micro)]


def grads_of(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


# --- schedule and optimiser ---------------------------------------------------------------------


def test_lr_schedule_warmup_then_cosine():
    lr = lambda step: lr_at(step, max_lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)  # noqa: E731
    assert lr(0) == pytest.approx(0.1) and lr(4) == pytest.approx(0.5) and lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.55)  # halfway through the cosine: the mean of max and min
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)
    after = [lr(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))
    assert lr_at(0, 1.0, 0.1, 0, 10) == pytest.approx(1.0)  # no warm-up at all


def test_weight_decay_only_on_matrices():
    model = tiny_model()
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    assert any(p is model.wte.weight for p in decay["params"])  # the tied matrix, once
    counted = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert counted == model.num_params()
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def test_precision_choice():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == torch.float32
    assert resolve_precision("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="int8")


# --- training -----------------------------------------------------------------------------------


def test_trainer_learns_and_records_history():
    config = TrainConfig(max_steps=60, batch_size=16, lr=3e-3, warmup_steps=5, eval_every=20,
                         eval_batches=4, log_every=10)
    trainer = Trainer(tiny_model(), pattern_data(), config, device="cpu")
    history = trainer.fit(progress=False)
    assert len(history.step_loss) == len(history.lr) == 60
    assert history.eval_step == [20, 40, 60]
    assert history.tokens_seen == [20 * 16 * 16, 40 * 16 * 16, 60 * 16 * 16]
    assert len(history.tokens_per_s) == 6 and all(r > 0 for r in history.tokens_per_s)
    assert history.step_loss[0] == pytest.approx(math.log(VOCAB), abs=0.3)
    # The pattern is 90% predictable: the loss must fall far below the uniform ln(24) = 3.18.
    assert history.val_loss[-1] < 1.5 and history.val_loss[-1] < history.val_loss[0]
    assert history.val_perplexity[-1] == pytest.approx(math.exp(history.val_loss[-1]))
    assert history.lr[4] == pytest.approx(3e-3) and history.lr[-1] == pytest.approx(3e-4, rel=0.05)
    assert trainer.mfu(1e6) is None  # a CPU has no peak in the table: no MFU, never a guess


def test_gradient_accumulation_equals_one_big_batch():
    batches = fixed_batches(4, 3)
    big = [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]
    accumulated = Trainer(tiny_model(), FixedBatches(batches),
                          TrainConfig(batch_size=3, grad_accum=4), device="cpu")
    single = Trainer(tiny_model(), FixedBatches(big), TrainConfig(batch_size=12), device="cpu")
    loss_a = accumulated.forward_backward()
    loss_b = single.forward_backward()
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    b = grads_of(single.raw_model)
    for name, grad in grads_of(accumulated.raw_model).items():
        torch.testing.assert_close(grad, b[name], rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_clipping_bounds_the_update_norm():
    trainer = Trainer(tiny_model(), FixedBatches(fixed_batches(1, 4)),
                      TrainConfig(grad_clip=1e-3, lr=1.0, warmup_steps=0), device="cpu")
    trainer.forward_backward()
    norm_before = torch.cat([p.grad.flatten() for p in trainer.raw_model.parameters()]).norm()
    assert norm_before > 1e-2
    captured = {}
    original = trainer.optimizer.step

    def spy(*args, **kwargs):
        captured["norm"] = torch.cat([p.grad.flatten() for p in trainer.raw_model.parameters()]).norm()
        return original(*args, **kwargs)

    trainer.optimizer.step = spy
    trainer.optimizer_step()
    assert captured["norm"].item() == pytest.approx(1e-3, rel=1e-4)


def test_train_loop_is_the_trainers_loop():
    """The written-out loop (chapter 10's exercise) takes the Trainer's steps: same losses, same
    learning rates, same weights, with accumulation and clipping."""
    batches = fixed_batches(3, 4, seed=3)
    config = TrainConfig(max_steps=7, batch_size=4, grad_accum=3, lr=3e-3, min_lr=3e-4, warmup_steps=3,
                         grad_clip=0.5, eval_every=0, precision="fp32")
    trainer = Trainer(tiny_model(), FixedBatches(batches), config, device="cpu")
    trainer.fit(progress=False)
    model = tiny_model()
    served = FixedBatches(batches)
    history = train_loop(model, make_optimizer(model, 3e-3, device="cpu"),
                         lambda: served.get_batch("train", 4, 16), 7, 3e-3, 3e-4, 3,
                         accum_steps=3, grad_clip=0.5)
    assert served.calls == 21
    assert history["lr"] == pytest.approx(trainer.history.lr, rel=1e-12)
    assert history["train_loss"] == pytest.approx(trainer.history.step_loss, rel=1e-5)
    assert history["eval_step"] == [] and history["val_loss"] == []
    for (name, a), b in zip(model.named_parameters(), trainer.raw_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        assert a.grad is None


def test_train_loop_evaluates_in_eval_mode_when_asked():
    model = tiny_model(dropout=0.3)
    val = fixed_batches(2, 3, seed=9)
    history = train_loop(model, torch.optim.SGD(model.parameters(), lr=0.1),
                         lambda: fixed_batches(1, 2)[0], 5, 0.1, 0.01, 0, eval_every=2, val_batches=val)
    assert history["eval_step"] == [2, 4, 5] and len(history["train_loss"]) == 5
    assert history["lr"][0] == pytest.approx(0.1)
    assert model.training
    want = lm_train.evaluate_batches(model, val)
    assert model.training
    with torch.no_grad():
        model.eval()
        assert want == pytest.approx(sum(float(model(x, y)[1]) for x, y in val) / 2, rel=1e-6)
    # No dropout while evaluating: twice the same number.
    assert lm_train.evaluate_batches(model, val) == want


# --- checkpoints --------------------------------------------------------------------------------


def test_weights_round_trip_bit_exact(tmp_path):
    model = tiny_model(seed=1)
    path = save_weights(model, tmp_path / "w.safetensors")
    other = tiny_model(seed=2)
    load_weights(other, path)
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert other.lm_head.weight is other.wte.weight  # still tied after loading
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # the tied matrix is stored once
        assert '"n_layer": 2' in f.metadata()["config"]


def test_weights_of_another_shape_are_refused(tmp_path):
    path = save_weights(tiny_model(), tmp_path / "w.safetensors")
    torch.manual_seed(0)
    wider = GPT(GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=3, n_head=2, n_embd=32))
    with pytest.raises(ValueError, match="do not fit"):
        load_weights(wider, path)


def test_resumed_run_continues_exactly_like_an_uninterrupted_one(tmp_path):
    config = TrainConfig(max_steps=8, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=4,
                         eval_batches=2, log_every=2)
    data = pattern_data()
    whole = Trainer(tiny_model(dropout=0.1), data, config, device="cpu")
    whole.fit(progress=False)

    first = Trainer(tiny_model(dropout=0.1), data, config, device="cpu")
    first.fit(steps=5, progress=False)
    first.save(tmp_path / "ckpt")
    torch.manual_seed(123)  # disturb the global RNG: the checkpoint must restore it
    resumed = Trainer(tiny_model(seed=9, dropout=0.1), data, config, device="cpu").load(tmp_path / "ckpt")
    assert resumed.step == 5
    resumed.fit(progress=False)

    assert resumed.history.step_loss == whole.history.step_loss  # bit-exact, step by step
    assert resumed.history.val_loss == whole.history.val_loss
    assert resumed.history.lr == whole.history.lr
    for (name, a), b in zip(whole.raw_model.state_dict().items(),
                            resumed.raw_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    state_a, state_b = whole.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for key in state_a:
        assert torch.equal(state_a[key]["exp_avg_sq"], state_b[key]["exp_avg_sq"])


def test_export_and_load_model(tmp_path):
    model = tiny_model()
    tokenizer = CharTokenizer([chr(65 + i) for i in range(VOCAB)])
    folder = export_model(model, tokenizer, tmp_path / "export", {"val_loss": 1.23})
    loaded, loaded_tokenizer, metrics = load_model(folder, device="cpu")
    assert metrics == {"val_loss": 1.23}
    assert loaded.config == model.config and not loaded.training
    assert loaded_tokenizer.fingerprint() == tokenizer.fingerprint()
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=2**-8, atol=1e-6, msg=name)  # stored in bf16
    data = pattern_data()
    assert exact_loss(loaded, data.val) == pytest.approx(exact_loss(model, data.val), abs=2e-3)
    size = (folder / lm_train.WEIGHTS_FILE).stat().st_size
    assert size < 2 * model.num_params() + 4096  # two bytes a parameter, plus the header


def test_missing_pretrained_checkpoint_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(lm_train, "PRETRAINED_ROOT", tmp_path)
    with pytest.raises(FileNotFoundError, match="scripts/pretrain_gpt.py"):
        load_pretrained()


def test_shipped_checkpoint_loads_and_models_held_out_text():
    """The checkpoint in the repository (scripts/pretrain_gpt.py --preset gpu): small enough to
    ship, loads on the CPU, and predicts text from works it never saw far better than chance."""
    folder = lm_train.PRETRAINED_ROOT / lm_train.PRETRAINED_NAME
    assert (folder / lm_train.WEIGHTS_FILE).stat().st_size <= 25 * 1024 * 1024
    model, tokenizer, metrics = load_pretrained(device="cpu")
    assert model.config.to_dict() == metrics["model"]
    assert metrics["val_loss"] < 4.0 and "scripts/pretrain_gpt.py --preset gpu" in metrics["command"]
    # A held-out passage (Romeo and Juliet is one of the validation works; see metrics.json).
    text = ("ROMEO.\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet "
            "is the sun.\nArise, fair sun, and kill the envious moon,\n")
    ids = torch.tensor([tokenizer.encode(text)])
    assert tokenizer.decode(ids[0].tolist()) == text
    _, loss = model(ids[:, :-1], ids[:, 1:])
    uniform = math.log(tokenizer.vocab_size)  # 7.6 nats: a model that learned nothing
    assert loss.item() < 0.65 * uniform, loss.item()
    sample = model.generate(ids[:, :8], 40, temperature=0.8, top_k=50,
                            generator=torch.Generator().manual_seed(0))
    assert sample.shape == (1, 48) and sample.max() < tokenizer.vocab_size


def test_history_serialises():
    history = LMHistory(step_loss=[3.0, 2.5], lr=[1e-3, 1e-3], eval_step=[2], train_loss=[2.4],
                        val_loss=[2.6], tokens_seen=[64], elapsed_s=[0.5], tokens_per_s=[128.0])
    assert LMHistory.from_dict(history.to_dict()) == history


# --- data parallelism ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One process of a two-process gloo run: its own two micro-batches of the shared batch."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    context = init_distributed(device_type="cpu")
    try:
        batches = fixed_batches(4, 3)[2 * rank:2 * rank + 2]
        trainer = Trainer(tiny_model(), FixedBatches(batches),
                          TrainConfig(batch_size=3, grad_accum=2, warmup_steps=0), distributed=context)
        loss = trainer.forward_backward()
        grads = grads_of(trainer.raw_model)
        trainer.optimizer_step()
        trainer._pending_losses.append(loss)
        mean_loss = trainer._flush()[0]
        torch.save({"grads": grads, "params": trainer.raw_model.state_dict(), "loss": mean_loss},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_equals_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    single = Trainer(tiny_model(), FixedBatches(fixed_batches(4, 3)),
                     TrainConfig(batch_size=3, grad_accum=4, warmup_steps=0), device="cpu")
    loss = single.forward_backward()
    expected = grads_of(single.raw_model)
    single.optimizer_step()
    for result in ranks:
        assert result["loss"] == pytest.approx(loss.item(), rel=1e-6)
        for name, grad in expected.items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
        for name, param in single.raw_model.state_dict().items():
            torch.testing.assert_close(result["params"][name], param, rtol=1e-5, atol=1e-6, msg=name)
    # both processes applied the same update
    for name, param in ranks[0]["params"].items():
        assert torch.equal(param, ranks[1]["params"][name]), name
