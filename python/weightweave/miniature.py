"""The paper's three setups in miniature, on real data, to answer one question: does Weight Weaving
give a better model than a blind λ when no evaluation data may be used?

Data: scikit-learn's bundled handwritten digits (1,797 8×8 images; shipped inside the package,
nothing is downloaded). Six *domains* are deterministic transforms of the real images (the
originals, inverted, rotated, mirrored, blurred, thickened), standing in for the paper's datasets.

Model: a ~10^5-parameter MLP encoder and a frozen shared head of class prototypes learned in
pre-training (the role of CLIP's zero-shot head), so the pre-trained model already has zero-shot
accuracy on every domain. Only the encoder is fine-tuned, and only the encoder is merged, through
``weightweave.merge_arrays`` / ``weave_arrays``.

Setups (paper §4):
- multi-task: one fine-tune per domain, all merged, mean accuracy over the domains;
- continual: class-incremental splits {0,1},{2,3},… of one domain, fine-tuned sequentially (split t
  starts from the fine-tune of split t−1), task vectors taken against θ_pre, evaluated on all
  classes;
- domain generalization: leave one domain out, merge the other fine-tunes, test on the held-out
  domain; mean over the held-out domains.

Everything is seeded: the same seed gives the same numbers on the same machine and library
versions (torch runs single-threaded here for that).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DOMAINS = ("original", "inverted", "rotated", "mirrored", "blurred", "thick")
#: The methods of the Weight Weaving paper (its claims are checked averaged over these) ...
PAPER_METHODS = ("task_arithmetic", "breadcrumbs", "magmax", "ties", "pcb", "tsv", "iso_c")
#: ... and the newer data-free methods and λ rules, with and without Weight Weaving.
METHODS = PAPER_METHODS + ("iso_cts", "wudi", "task_arithmetic+metagpt", "ties+metagpt", "task_arithmetic+lines",
                           "ties+lines")  # fmt: skip
#: The data-free λ a method name may carry after a '+': MetaGPT's weights, LiNeS's depth scaling.
VARIANTS = {"metagpt": {"weights": "metagpt"}, "lines": {"lines": True}}
POOLS = ("mean", "random", "magmax")
CL_DOMAIN = "rotated"
CL_SPLITS = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
N_PRETRAIN = 300
N_TEST = 497
SCALE = 10.0  # logit scale of the cosine head (CLIP's learned temperature, fixed here)


def transform(images: np.ndarray, domain: str) -> np.ndarray:
    """The images (N×8×8, values in [0, 1]) as seen in ``domain``; deterministic."""
    x = images
    if domain == "original":
        return x.copy()
    if domain == "inverted":
        return 1.0 - x
    if domain == "rotated":
        return np.ascontiguousarray(np.rot90(x, 1, axes=(1, 2)))
    if domain == "mirrored":
        return np.ascontiguousarray(x[:, :, ::-1])
    pad = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    shifts = [pad[:, i : i + 8, j : j + 8] for i in range(3) for j in range(3)]
    if domain == "blurred":
        return np.mean(shifts, axis=0)
    if domain == "thick":
        return np.max(shifts, axis=0)
    raise ValueError(f"unknown domain '{domain}' (known: {', '.join(DOMAINS)})")


@dataclass(frozen=True)
class Data:
    """One seed's split of the digits: a pre-training set, a disjoint fine-tuning set per
    domain, and a test set shared by all domains (transformed per domain)."""

    pretrain: tuple[np.ndarray, np.ndarray]
    tune: dict[str, tuple[np.ndarray, np.ndarray]]
    test: tuple[np.ndarray, np.ndarray]


def load_data(seed: int) -> Data:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    test, pre, rest = order[:N_TEST], order[N_TEST : N_TEST + N_PRETRAIN], order[N_TEST + N_PRETRAIN :]
    parts = np.array_split(rest, len(DOMAINS))
    return Data(
        pretrain=(images[pre], labels[pre]),
        tune={d: (transform(images[p], d), labels[p]) for d, p in zip(DOMAINS, parts, strict=True)},
        test=(images[test], labels[test]),
    )


def _torch():
    import torch

    torch.set_num_threads(1)
    return torch


def make_encoder(seed: int):
    torch = _torch()
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                         nn.Linear(256, 64))  # fmt: skip


def logits(encoder, prototypes, x, classes: Sequence[int] | None = None):
    torch = _torch()
    f = torch.nn.functional.normalize(encoder(x), dim=1)
    p = torch.nn.functional.normalize(prototypes, dim=1)
    out = SCALE * f @ p.T
    return out if classes is None else out[:, list(classes)]


def _train(encoder, prototypes, x, y, *, epochs: int, seed: int, classes=None, train_head=False) -> None:
    torch = _torch()
    params = list(encoder.parameters()) + ([prototypes] if train_head else [])
    opt = torch.optim.Adam(params, lr=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    if classes is not None:  # labels as indices into the split's classes
        yt = torch.tensor([list(classes).index(int(v)) for v in y])
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(yt), generator=g).split(32):
            loss = torch.nn.functional.cross_entropy(logits(encoder, prototypes, xt[idx], classes), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


@dataclass
class Zoo:
    """The pre-trained model and its fine-tunes for one seed."""

    seed: int
    data: Data
    prototypes: Any  # the frozen head (10 × 64)
    pre: dict[str, Any]  # encoder state dict θ_pre
    tuned: dict[str, dict[str, Any]] = field(default_factory=dict)  # per domain
    continual: list[dict[str, Any]] = field(default_factory=list)  # θ_1..θ_T, sequential

    def accuracy(self, state: dict[str, Any], domain: str, classes: Sequence[int] | None = None) -> float:
        torch = _torch()
        enc = make_encoder(0)
        enc.load_state_dict(state)
        x, y = self.data.test
        if classes is not None:
            keep = np.isin(y, classes)
            x, y = x[keep], y[keep]
        with torch.no_grad():
            pred = logits(enc, self.prototypes, torch.from_numpy(transform(x, domain))).argmax(1).numpy()
        return float((pred == y).mean())


def _state(encoder) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in encoder.state_dict().items()}


def build_zoo(seed: int, *, domains: Sequence[str] = DOMAINS, continual: bool = True,
              pretrain_epochs: int = 30, tune_epochs: int = 15) -> Zoo:  # fmt: skip
    """Pre-trains (encoder and prototypes, original domain), then fine-tunes the encoder alone
    (prototypes frozen) on each domain, and sequentially on the continual splits."""
    torch = _torch()
    data = load_data(seed)
    enc = make_encoder(seed)
    prototypes = torch.nn.Parameter(torch.randn(10, 64, generator=torch.Generator().manual_seed(seed)))
    _train(enc, prototypes, *data.pretrain, epochs=pretrain_epochs, seed=seed, train_head=True)
    prototypes = prototypes.detach().clone()
    zoo = Zoo(seed, data, prototypes, _state(enc))
    for k, d in enumerate(domains):
        e = make_encoder(0)
        e.load_state_dict(zoo.pre)
        _train(e, prototypes, *data.tune[d], epochs=tune_epochs, seed=seed * 100 + k)
        zoo.tuned[d] = _state(e)
    if continual:
        e = make_encoder(0)
        e.load_state_dict(zoo.pre)
        x, y = data.tune[CL_DOMAIN]
        for k, split in enumerate(CL_SPLITS):
            keep = np.isin(y, split)
            _train(e, prototypes, x[keep], y[keep], epochs=tune_epochs, seed=seed * 100 + 50 + k, classes=split)
            zoo.continual.append(_state(e))
    return zoo


# ---- merging, all through weightweave ---------------------------------------------------------


def split_method(method: str) -> tuple[str, dict[str, Any]]:
    """``"ties+lines"`` → ("ties", LiNeS's options): a method and its data-free λ variant."""
    name, _, variant = method.partition("+")
    return name, dict(VARIANTS[variant]) if variant else {}


# The encoder's three linear layers as LiNeS's blocks 0, 1, 2 (nn.Sequential numbers them 1, 3, 5).
_BLOCKS = {"1.": "layers.0.", "3.": "layers.1.", "5.": "layers.2."}


def _as_blocks(sd: dict[str, Any]) -> dict[str, Any]:
    return {next(b + k[len(p):] for p, b in _BLOCKS.items() if k.startswith(p)): v for k, v in sd.items()}


def _from_blocks(sd: dict[str, Any]) -> dict[str, Any]:
    return {next(p + k[len(b):] for p, b in _BLOCKS.items() if k.startswith(b)): v for k, v in sd.items()}


def merged(base: dict[str, Any], models: list[dict[str, Any]], method: str, *, lam: float | None = None,
           pool: str | None = None, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """θ_pre + λ·M (``pool`` None) or Weight Weaving over the default Λ with ``pool``; a
    ``+metagpt`` or ``+lines`` method takes that data-free λ (λ is then LiNeS's β)."""
    from . import api

    method, extra = split_method(method)
    if method in api.SVD_METHODS:
        extra["device"] = "cpu"
    if extra.get("lines"):
        base, models = _as_blocks(base), [_as_blocks(m) for m in models]
    if pool is None:
        out = api.merge_arrays(base, models, method=method, lam=lam, seed=seed, threads=1, **extra)
    else:
        out = api.weave_arrays(base, models, method=method, pool=pool, seed=seed, threads=1, **extra)
    return _from_blocks(out) if extra.get("lines") else out


@dataclass(frozen=True)
class Scenario:
    """One merge to evaluate: the models, and the score of a merged state."""

    base: dict[str, Any]
    models: list[dict[str, Any]]
    score: Callable[[dict[str, Any]], float]


def scenarios(zoo: Zoo, setup: str) -> list[Scenario]:
    """The merges a setup averages over (several for domain generalization)."""
    if setup == "multitask":
        doms = list(zoo.tuned)
        return [Scenario(zoo.pre, [zoo.tuned[d] for d in doms],
                         lambda s: float(np.mean([zoo.accuracy(s, d) for d in doms])))]  # fmt: skip
    if setup == "continual":
        return [Scenario(zoo.pre, zoo.continual, lambda s: zoo.accuracy(s, CL_DOMAIN))]
    if setup == "domain":
        out = []
        for held in zoo.tuned:
            others = [zoo.tuned[d] for d in zoo.tuned if d != held]
            out.append(Scenario(zoo.pre, others, lambda s, held=held: zoo.accuracy(s, held)))
        return out
    raise ValueError(f"unknown setup '{setup}'")


def references(zoo: Zoo, setup: str) -> dict[str, float]:
    """Zero-shot, each fine-tune alone, and plain weight averaging."""
    rows: dict[str, list[float]] = {"zero-shot": [], "fine-tunes alone": [], "weight averaging": []}
    for sc in scenarios(zoo, setup):
        rows["zero-shot"].append(sc.score(sc.base))
        if setup == "multitask":  # each fine-tune on its own domain
            alone = float(np.mean([zoo.accuracy(zoo.tuned[d], d) for d in zoo.tuned]))
        elif setup == "continual":  # the last sequential fine-tune: what forgetting leaves
            alone = sc.score(sc.models[-1])
        else:  # the other domains' fine-tunes on the held-out one
            alone = float(np.mean([sc.score(m) for m in sc.models]))
        rows["fine-tunes alone"].append(alone)
        rows["weight averaging"].append(sc.score(merged(sc.base, sc.models, "task_arithmetic",
                                                         lam=1.0 / len(sc.models))))  # fmt: skip
    return {k: float(np.mean(v)) for k, v in rows.items()}


def evaluate(zoo: Zoo, setup: str, method: str) -> dict[str, Any]:
    """λ = 1, the authors' λ, Weight Weaving with each pool, the accuracy curve over the default
    Λ and its best point (the test-set oracle), each averaged over the setup's scenarios."""
    from . import api

    name, _ = split_method(method)
    lambdas = api.default_lambdas(name)
    author = api._rust.default_lam(name)
    acc: dict[str, list[float]] = {"lam=1": [], "author": [], "best": []}
    acc.update({f"ww_{p}": [] for p in POOLS})
    curves = []
    lines = bool(split_method(method)[1].get("lines"))
    for sc in scenarios(zoo, setup):
        one = merged(sc.base, sc.models, method, lam=1.0)
        if lines:  # λ is LiNeS's β: each point is a merge of its own
            curve = [sc.score(merged(sc.base, sc.models, method, lam=lam)) for lam in lambdas]
        else:
            # θ_pre + λ·M along Λ from the library's own M (its merge at λ = 1): M costs minutes
            # for WUDI, and does not depend on λ.
            m = {k: one[k] - sc.base[k] for k in one}
            curve = [sc.score({k: sc.base[k] + lam * m[k] for k in one}) for lam in lambdas]
        curves.append(curve)
        acc["lam=1"].append(sc.score(one))
        acc["author"].append(acc["lam=1"][-1] if author == 1.0 else
                             sc.score(merged(sc.base, sc.models, method, lam=author)))  # fmt: skip
        acc["best"].append(max(curve))
        for p in POOLS:
            acc[f"ww_{p}"].append(sc.score(merged(sc.base, sc.models, method, pool=p, seed=zoo.seed)))
    out: dict[str, Any] = {k: float(np.mean(v)) for k, v in acc.items()}
    out["lambdas"] = lambdas
    out["curve"] = [float(v) for v in np.mean(curves, axis=0)]
    out["author_lam"] = author
    return out
