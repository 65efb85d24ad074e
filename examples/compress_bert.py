"""Compress a small BERT classifier: train, prune heads and FFN to half the MACs, distil, int8.

python examples/compress_bert.py [--fast] [OUT_DIR]

The task, generated offline and seeded: a sequence ``[CLS] a1 b1 a2 b2 … ak bk [SEP]`` of k
pairs of distinct digits (k = 3, 5 or 7, padded to 16 tokens with an attention mask); the
label is whether ``a > b`` in most pairs. Swapping the two digits of every pair keeps the
bag of tokens and flips the label, so a bag-of-words model cannot beat chance (the script
fits two and prints their accuracy); the model has to attend from each digit to its
partner and count the comparisons.

Steps, each measured on 4096 held-out sequences:

1. the teacher, a transformers ``BertForSequenceClassification`` (2 layers, hidden 128,
   4 heads, FFN 256, random init), trained in plain PyTorch;
2. ``prune(target=0.5)``: attention and FFN widths cut to half the MACs, no training;
3. ``prune(target=0.5),distill(…)``: the pruned student trained towards the teacher's
   logits on ``(input_ids, attention_mask, labels)`` batches;
4. ``quant``: int8 (dynamic int8 Linear, the default for token models), written to
   ``OUT_DIR/bert_int8.pt`` and checked against the in-memory model.

About 20 minutes on two shared cores (1175 s at load 3–5: teacher 96.41%, pruned to 50.2%
of the MACs 84.81%, distilled 96.53%, int8 96.41%); ``--fast`` (what the test suite runs,
about 30 s) trains on less for fewer steps and gives lower accuracies.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from graphopt.passes.distill import TrainVal
from transformers import BertConfig, BertForSequenceClassification

import graphopt

DIGITS = 10
CLS, SEP, PAD = DIGITS, DIGITS + 1, DIGITS + 2
VOCAB = DIGITS + 3
LENGTH = 16
BATCH = 64  # the captured graph takes batches of this size


def make_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` sequences of the majority-of-pairs task: token ids, attention mask, labels."""
    g = torch.Generator().manual_seed(seed)
    pairs = torch.randint(1, 4, (n,), generator=g) * 2 + 1  # 3, 5 or 7 pairs: no ties
    a = torch.randint(0, DIGITS, (n, 7), generator=g)
    b = (a + torch.randint(1, DIGITS, (n, 7), generator=g)) % DIGITS  # b != a
    used = torch.arange(7) < pairs[:, None]
    label = (((a > b) & used).sum(1) * 2 > pairs).long()
    ids = torch.full((n, LENGTH), PAD)
    ids[:, 0] = CLS
    ids[:, 1:15] = torch.stack([a, b], 2).flatten(1)
    length = 2 * pairs + 2  # [CLS], the pairs, [SEP]
    position = torch.arange(LENGTH)
    ids[position == (length - 1)[:, None]] = SEP
    mask = (position < length[:, None]).long()
    ids[mask == 0] = PAD
    return ids, mask, label


def bag_of_words_accuracy(train: tuple, test: tuple) -> dict[str, float]:
    """Held-out accuracy of two bag-of-words classifiers (token counts, order ignored)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    def counts(ids: torch.Tensor) -> object:
        return F.one_hot(ids, VOCAB).sum(1).float().numpy()

    found = {}
    n = min(len(train[2]), 4000)
    for clf in (LogisticRegression(max_iter=1000), MLPClassifier((64,), random_state=0)):
        clf.fit(counts(train[0][:n]), train[2][:n].numpy())
        found[type(clf).__name__] = 100 * clf.score(counts(test[0]), test[2].numpy())
    return found


def train_teacher(train: tuple, steps: int) -> BertForSequenceClassification:
    """A small BERT trained from scratch with AdamW and a one-cycle schedule."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=LENGTH,
        num_labels=2,
        pad_token_id=PAD,
    )
    model = BertForSequenceClassification(config)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        pick = torch.randint(0, len(train[2]), (BATCH,), generator=g)
        ids, mask, label = (t[pick] for t in train)
        loss = model(input_ids=ids, attention_mask=mask, labels=label).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def batches(data: tuple, count: int | None = None) -> list[tuple[torch.Tensor, ...]]:
    """``(input_ids, attention_mask, labels)`` batches of BATCH sequences (the last partial
    batch dropped: the captured graph has a fixed batch size)."""
    n = len(data[2]) // BATCH if count is None else count
    return [tuple(t[i * BATCH : (i + 1) * BATCH] for t in data) for i in range(n)]


def accuracy(model: torch.nn.Module, test: list[tuple[torch.Tensor, ...]]) -> float:
    """Held-out accuracy in percent; ``model`` takes (input_ids, attention_mask)."""
    hits = total = 0
    with torch.no_grad():
        for ids, mask, label in test:
            logits = graphopt.primary_output(graphopt.run_model(model, (ids, mask)))
            assert logits is not None
            hits += int((logits.argmax(1) == label).sum())
            total += len(label)
    return 100 * hits / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="out", help="where bert_int8.pt goes")
    parser.add_argument("--fast", action="store_true", help="train on less, for fewer steps")
    options = parser.parse_args()
    fast, out_dir = options.fast, options.out_dir
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.time()
    n_train, steps, epochs = (2048, 150, 1) if fast else (20480, 1500, 5)
    train_set, val_set, test_set = make_task(n_train, 0), make_task(1024, 1), make_task(4096, 2)
    test = batches(test_set, 16 if fast else None)
    for name, acc in bag_of_words_accuracy(train_set, test_set).items():
        print(f"bag-of-words baseline ({name}): {acc:.2f}% held-out accuracy")

    teacher = train_teacher(train_set, steps)
    example = (test[0][0], test[0][1])
    ir = graphopt.trace(teacher, example, input_names=["input_ids", "attention_mask"])
    rows = [("teacher (float)", 100.0, accuracy(ir.gm, test))]

    pruned = graphopt.optimize(ir, "prune(target=0.5)")
    macs = 100 * pruned.ir.total_macs() / ir.total_macs()
    rows.append(("prune(target=0.5), no training", macs, accuracy(pruned.ir.gm, test)))

    # The teacher is the pipeline's input model; batches are (input_ids, attention_mask,
    # labels); TrainVal lets distill validate (early stopping, best weights kept).
    data = TrainVal(batches(train_set), batches(val_set))
    pipeline = (
        f"prune(target=0.5),distill(epochs={epochs},lr=2e-3,beta=0,patience=0,progress=false)"
    )
    distilled = graphopt.optimize(ir, pipeline, data=data)
    rows.append(("… then distilled", macs, accuracy(distilled.ir.gm, test)))

    out = os.path.join(out_dir, "bert_int8.pt")
    quantized = graphopt.optimize(distilled.ir, "quant", data=batches(train_set, 8), output=out)
    rows.append(("… then quant (int8)", macs, accuracy(quantized.ir.gm, test)))

    print(f"\n{'model':<34} {'MACs':>7} {'accuracy':>9}")
    for name, share, acc in rows:
        print(f"{name:<34} {share:>6.1f}% {acc:>8.2f}%")
    float_acc, int8_acc = rows[2][2], rows[3][2]
    print(f"\nteacher − distilled: {rows[0][2] - float_acc:+.2f} points; "
          f"int8 accuracy {int8_acc:.2f}% ({int8_acc - float_acc:+.2f} points from float); "
          f"wrote {out} in {time.time() - start:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
