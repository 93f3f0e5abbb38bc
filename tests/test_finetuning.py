"""Unit tests of course_lib.finetuning: data split, heads, freezing, LoRA, imbalance, metrics."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_lib import finetuning as ft
from course_lib.bert import Bert, BertConfig
from course_lib.embeddings import TEST_PLAYS
from course_lib.gpt import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_gpt_classifier(n_classes=3):
    torch.manual_seed(0)
    return ft.GPTClassifier(
        GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=3, n_head=2, n_embd=8)), n_classes
    )


def small_bert_classifier(n_classes=3):
    torch.manual_seed(0)
    return ft.BertClassifier(
        Bert(
            BertConfig(vocab_size=40, max_position=16, n_layer=3, n_head=2, n_embd=8, n_inner=16, dropout=0.0)
        ),
        n_classes,
        dropout=0.0,
    )


def test_genre_texts_split_by_play():
    data = ft.genre_texts(passage_words=40, max_per_play=20)
    train_plays, test_plays = set(data["train"][2]), set(data["test"][2])
    assert test_plays == set(TEST_PLAYS) and not train_plays & test_plays
    assert len(train_plays) == 26
    for texts, labels, plays in data.values():
        assert len(texts) == len(labels) == len(plays)
        assert all(len(t.split()) == 40 for t in texts)
        assert set(labels.tolist()) == {0, 1, 2}
    assert not set(data["train"][0]) & set(data["test"][0])


def test_last_token_logits_reads_last_real_token():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float64).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([0.5, -1.0], dtype=torch.float64)
    out = ft.last_token_logits(hidden, mask, w, b)
    want = torch.stack([hidden[0, 1] @ w.T + b, hidden[1, 3] @ w.T + b])
    torch.testing.assert_close(out, want)
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])  # left padding: still the last real one
    torch.testing.assert_close(ft.last_token_logits(hidden, left, w, b)[:, 0], hidden[:, 3, 0] + 0.5)


def test_gpt_classifier_ignores_right_padding():
    model = small_gpt_classifier().eval()
    ids = torch.tensor([[5, 6, 7, 0, 0], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = model(ids, mask)
    torch.testing.assert_close(out[0], model(ids[:1, :3], mask[:1, :3])[0])
    h = model.hidden_at(2, ids)
    torch.testing.assert_close(model(ids, mask, start_layer=2, hidden=h), out)


def test_freeze_layers_gpt_and_bert():
    model = small_gpt_classifier()
    n = ft.freeze_layers(model, 1)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(name.startswith(("gpt.blocks.2.", "gpt.ln_f.", "head.")) for name in trainable)
    assert {"head.weight", "head.bias", "gpt.ln_f.weight", "gpt.blocks.2.attn.qkv.weight"} <= trainable
    assert n == sum(p.numel() for name, p in model.named_parameters() if name in trainable)
    assert ft.freeze_layers(model, 0) == 8 * 3 + 3 + 2 * 8
    everything = sum(p.numel() for p in model.parameters())
    frozen_embeddings = model.gpt.wte.weight.numel() + model.gpt.wpe.weight.numel()
    assert ft.freeze_layers(model, 3) == everything - frozen_embeddings
    bert_model = small_bert_classifier()
    ft.freeze_layers(bert_model, 2)
    trainable = {name for name, p in bert_model.named_parameters() if p.requires_grad}
    assert trainable and all(
        name.startswith(("bert.blocks.1.", "bert.blocks.2.", "head.")) for name in trainable
    )


def test_lora_starts_at_base_and_follows_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    lora = ft.LoRALinear(base, r=2, alpha=8.0)
    x = torch.randn(5, 6)
    torch.testing.assert_close(lora(x), base(x))  # B = 0
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert ft.count_trainable(lora) == 2 * (6 + 4)
    with torch.no_grad():
        lora.B.normal_()
    want = base(x) + (8.0 / 2) * x @ lora.A.T @ lora.B.T
    torch.testing.assert_close(lora(x), want)
    merged = lora.merged()
    assert isinstance(merged, nn.Linear)
    torch.testing.assert_close(merged(x), lora(x), rtol=1e-5, atol=1e-5)
    lora(x).sum().backward()
    assert lora.A.grad is not None and lora.B.grad is not None and base.weight.grad is None


def test_add_and_merge_lora_on_bert():
    model = small_bert_classifier().eval()
    ids, mask = torch.randint(1, 40, (3, 7)), torch.ones(3, 7, dtype=torch.long)
    before = model(ids, mask)
    n = ft.add_lora(model, r=2, alpha=4.0)
    assert n == 3 * 2 * 2 * (8 + 8) + 3 * 8 + 3
    torch.testing.assert_close(model(ids, mask), before)
    for p in model.parameters():
        if p.requires_grad and p.dim() == 2 and p.shape[0] == 8:
            with torch.no_grad():
                p.normal_()
    unmerged = model(ids, mask)
    ft.merge_lora(model)
    assert not any(isinstance(m, ft.LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(ids, mask), unmerged, rtol=1e-5, atol=1e-5)


def test_class_weights_and_weighted_cross_entropy():
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    torch.testing.assert_close(ft.class_weights(labels, 4), torch.tensor([0.5, 1.5, 0.75, 0.0]))
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        logits = torch.randn(50, 5, generator=g, dtype=dtype)
        y = torch.randint(0, 5, (50,), generator=g)
        w = torch.rand(5, generator=g, dtype=dtype) + 0.1
        torch.testing.assert_close(
            ft.weighted_cross_entropy(logits, y, w), F.cross_entropy(logits, y, weight=w)
        )


def test_oversample_balances():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 1)
    idx = ft.oversample(labels, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[idx]).tolist() == [10, 10, 10]
    assert set(idx[labels[idx] == 0].tolist()) == set(range(10))


def test_metrics_against_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n_classes = 2 + trial % 4
        y_true = torch.randint(0, n_classes, (int(torch.randint(1, 60, (1,), generator=g)),), generator=g)
        y_pred = torch.randint(0, max(1, n_classes - 1), y_true.shape, generator=g)  # a class never predicted
        m = ft.classification_metrics(y_true, y_pred, n_classes)
        labels = list(range(n_classes))
        p, r, f, _ = sk.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
        torch.testing.assert_close(m["precision"], torch.tensor(p, dtype=torch.float64))
        torch.testing.assert_close(m["recall"], torch.tensor(r, dtype=torch.float64))
        torch.testing.assert_close(m["f1"], torch.tensor(f, dtype=torch.float64))
        assert m["macro_f1"].item() == pytest.approx(
            sk.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        )
        assert m["accuracy"].item() == pytest.approx(sk.accuracy_score(y_true, y_pred))
        assert m["confusion"].tolist() == sk.confusion_matrix(y_true, y_pred, labels=labels).tolist()


def test_fit_classifier_learns_a_separable_task():
    model = small_bert_classifier(2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 40, (64, 6), generator=g)
    labels = (ids[:, 0] < 20).long()
    mask = torch.ones_like(ids)
    ft.freeze_layers(model, 3)
    losses = ft.fit_classifier(
        model, {"ids": ids, "attention_mask": mask}, labels, steps=150, lr=1e-2, batch_size=16, generator=g
    )
    assert losses[-1] < 0.5 * losses[0]
    acc = (ft.predict_logits(model, {"ids": ids, "attention_mask": mask}).argmax(1) == labels).float().mean()
    assert acc > 0.9


def test_split_validation_holds_out_whole_training_plays():
    data = ft.split_validation(ft.genre_texts(passage_words=40, max_per_play=20), val_fraction=0.2, seed=0)
    train, val, test = (set(data[k][2]) for k in ("train", "val", "test"))
    assert not train & val and not (train | val) & test and test == set(TEST_PLAYS)
    assert len(train | val) == 26 and len(val) >= 2
    n_val, n_all = len(data["val"][0]), len(data["val"][0]) + len(data["train"][0])
    assert 0.2 <= n_val / n_all < 0.2 + 20 / n_all  # overshoots by less than one play (20 passages)
    texts, labels, plays = data["val"]
    assert len(texts) == len(labels) == len(plays) and labels.dtype == torch.int64


def test_wilson_interval_known_values():
    lo, hi = ft.wilson_interval(81, 263)  # Wilson (1927) / Newcombe (1998) example: 0.2553 to 0.3662
    assert abs(lo - 0.2553) < 5e-4 and abs(hi - 0.3662) < 5e-4
    assert ft.wilson_interval(0, 10)[0] == 0.0 and ft.wilson_interval(10, 10)[1] == 1.0
    assert ft.wilson_interval(0, 10)[1] > 0.2  # not empty at p = 0
    with pytest.raises(ValueError):
        ft.wilson_interval(0, 0)


def test_bootstrap_by_group_is_wider_when_groups_disagree():
    groups = [g for g in range(8) for _ in range(20)]
    uniform = torch.tensor([i % 2 == 0 for i in range(160)])  # every play half right
    split = torch.tensor([g < 4 for g in groups])  # four plays all right, four all wrong
    lo_u, hi_u = ft.bootstrap_by_group(uniform, groups, seed=0)
    lo_s, hi_s = ft.bootstrap_by_group(split, groups, seed=0)
    assert lo_u == hi_u == 0.5  # no play differs from another: nothing to resample
    assert lo_s < 0.25 and hi_s > 0.75 and lo_s <= 0.5 <= hi_s
    assert ft.bootstrap_by_group(split, groups, seed=0) == (lo_s, hi_s)


def test_bow_baseline_learns_word_cues():
    train = ["the king the crown"] * 5 + ["the clown the jest"] * 5
    labels = torch.tensor([1] * 5 + [0] * 5)
    (pred,) = ft.bow_baseline(train, labels, [["a crown for the king", "a jest"]], n_classes=2)
    assert pred.tolist() == [1, 0]
