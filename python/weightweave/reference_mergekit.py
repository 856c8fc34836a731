"""A pure-torch reference of mergekit's semantics (``compat="mergekit"``), written from mergekit's
rules (``generalized_task_arithmetic.py``, ``sparsify.py``, ``linear.py``): per tensor, each delta
is sparsified alone (magnitude: the max(1, int(density·n)) largest |τ|; outliers: drop the largest
int(gamma·n), keep the next int(density·n), fewer dropped when needed; random: Bernoulli(density)),
optionally rescaled to its former L1 norm, then weighted; with sign consensus only the weighted
deltas of the majority sign (+ where their sum is ≥ 0) are summed, and ``normalize`` divides by
Σ w over the kept ones. Ties at a magnitude cut go to the earlier position (mergekit's order
there is torch's unstable sort). Random masks come from this project's counter-based generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .reference import StateDict, Tensor, dare_mask, mergeable_names, per_task

# name → (sparsification, consensus, normalize default, rescale default)
METHODS = {
    "task_arithmetic": (None, False, False, False),
    "ties": ("magnitude", True, True, False),
    "dare_ties": ("random", True, False, True),
    "dare_linear": ("random", False, False, True),
    "breadcrumbs": ("outliers", False, False, False),
    "breadcrumbs_ties": ("outliers", True, False, False),
}


def _keep_descending(x: Tensor, lo: int, hi: int) -> Tensor:
    """x with only the elements of descending |x| rank in [lo, hi) kept (stable: earlier first)."""
    flat = x.reshape(-1)
    order = torch.sort(flat.abs(), descending=True, stable=True).indices
    mask = torch.zeros_like(flat)
    mask[order[lo:hi]] = 1
    return (flat * mask).reshape(x.shape)


def sparsify(x: Tensor, kind: str | None, density: float, gamma: float, seed: int, task: int, name: str) -> Tensor:
    if kind is None or density >= 1:
        return x
    n = x.numel()
    if kind == "magnitude":
        if density <= 0 or n == 0:
            return torch.zeros_like(x)
        return _keep_descending(x, 0, max(1, int(density * n)))
    if kind == "outliers":
        target, top = int(density * n), int(gamma * n)
        bottom = max(0, n - target - top)
        # mergekit keeps ascending ranks [bottom, bottom + target).
        return _keep_descending(x, n - bottom - target, n - bottom)
    mask = torch.from_numpy(dare_mask(seed, task, name, n, density)).reshape(x.shape)
    return x * mask


def _rescale_l1(x: Tensor, masked: Tensor) -> Tensor:
    before, after = x.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def merged(
    base: StateDict,
    models: Sequence[StateDict],
    method: str,
    weights: Sequence[float] | None = None,
    seed: int = 0,
    **params: object,
) -> dict[str, Tensor]:
    """M per tensor (the mixed delta before λ), as mergekit mixes it."""
    kind, consensus, normalize, rescale = METHODS[method]
    normalize = bool(params.get("normalize", normalize))
    rescale = bool(params.get("rescale", rescale))
    ws = torch.tensor([1.0] * len(models) if weights is None else list(weights), dtype=torch.float32)
    out = {}
    for n in mergeable_names(base):
        b = base[n].to(torch.float32)
        deltas = []
        for t, m in enumerate(models):
            tau = m[n].to(torch.float32) - b
            d = sparsify(tau, kind, per_task(params.get("density", 1.0), t),
                         per_task(params.get("gamma", 0.01), t), seed, t, n)  # fmt: skip
            if rescale and kind is not None and per_task(params.get("density", 1.0), t) < 1:
                d = _rescale_l1(tau, d)
            deltas.append(d)
        w = ws.reshape(-1, *([1] * b.dim()))
        weighted = torch.stack(deltas) * w
        if consensus:
            majority = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
            mask = (torch.sign(weighted) == majority).to(torch.float32)
            mixed = (weighted * mask).sum(dim=0)
            divisor = (w * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = weighted.sum(dim=0)
            divisor = ws.sum()
            if divisor.abs() < 1e-8:
                divisor = torch.tensor(1.0)
        out[n] = mixed / divisor if normalize else mixed
    return out


def merge(
    base: StateDict,
    models: Sequence[StateDict],
    method: str,
    weights: Sequence[float] | None = None,
    lam: float = 1.0,
    seed: int = 0,
    **params: object,
) -> dict[str, Tensor]:
    """mergekit's merged model: base + λ·M in the base's dtype (``linear``: Σ w θ / Σ w)."""
    if method == "linear":
        return linear(models, weights, bool(params.get("normalize", True)), base)
    m = merged(base, models, method, weights, seed, **params)
    out = {}
    for n, t in base.items():
        out[n] = (t.to(torch.float32) + (m[n] * lam if lam != 1 else m[n])).to(t.dtype) if n in m else t.clone()
    return out


def fma32(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """a·b + c rounded once to f32 (IEEE fusedMultiplyAdd), from f64 arithmetic: the product of
    two f32 is exact in f64, TwoSum gives the f64 sum and its exact error, and the error decides
    the one case where rounding the f64 sum to f32 could go the wrong way (a sum exactly halfway
    between two f32 values)."""
    p = a.double() * b.double()
    c64 = c.double()
    s = p + c64
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)
    r = s.to(torch.float32)
    toward = torch.nextafter(r, torch.where(s > r.double(), torch.tensor(float("inf")), torch.tensor(float("-inf"))))
    halfway = (r.double() != s) & ((r.double() + toward.double()) / 2 == s) & (err != 0)
    up = err > 0
    fixed = torch.where(up, torch.maximum(r, toward), torch.minimum(r, toward))
    return torch.where(halfway, fixed, r)


def linear(
    models: Sequence[StateDict], weights: Sequence[float] | None, normalize: bool, like: StateDict
) -> dict[str, Tensor]:
    """Σ_t w_t θ_t, accumulated from zero in model order with fused multiply-adds (mergekit's
    ``addcmul_``), ÷ Σ_t w_t with ``normalize``."""
    ws = [1.0] * len(models) if weights is None else [float(w) for w in weights]
    out = {}
    for n in like:
        if n not in mergeable_names(like):
            out[n] = like[n].clone()
            continue
        acc = torch.zeros_like(models[0][n], dtype=torch.float32)
        for m, w in zip(models, ws, strict=True):
            acc = fma32(m[n].to(torch.float32), torch.tensor(w, dtype=torch.float32), acc)
        if normalize:
            acc = acc / torch.tensor(ws, dtype=torch.float32).sum()
        out[n] = acc.to(like[n].dtype)
    return out


# Per-tensor parameters, from mergekit 0.1.5's config.py (evaluate_setting), parameter_resolver.py
# (scopes in precedence order) and plan.py (t of a layer within its slice).


def evaluate_setting(tensor_name: str, setting: object, t: float) -> object:
    """A setting's value at one tensor: a scalar is itself; a list of scalars is a gradient (numbers
    interpolated at t·(n−1), anything else stepped); a list of conditions gives the value of the
    first whose filter is None, "*" or a substring of the name; None when nothing matches."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (tensor_name and f in tensor_name):
            return evaluate_setting(tensor_name, cond["value"], t)
    return None


def resolve(name: str, key: str, scopes: Sequence[dict | None], t: float, default: object = None) -> object:
    """The first scope (narrowest first: the model's, then the config's) whose setting of ``key``
    gives a value at this tensor; else ``default``."""
    for scope in scopes:
        if scope is not None and key in scope:
            v = evaluate_setting(name, scope[key], t)
            if v is not None:
                return v
    return default


def layer_t(name: str, layers: int) -> float:
    """t of a tensor in a whole-model merge (one slice over every layer): layer i of ``layers`` has
    i/(layers − 1), or 1 when there is one layer; the weights before and after the layers
    (embeddings, final norm, head) are planned with t = 0."""
    import re

    m = re.search(r"(?:^|\.)layers?\.(\d+)\.", name)
    if m is None:
        return 0.0
    return 1.0 if layers <= 1 else int(m.group(1)) / (layers - 1)


def merge_in_dtype(
    base: StateDict,
    models: Sequence[StateDict],
    method: str,
    weights: Sequence[float],
    dtype: torch.dtype,
    lam: float = 1.0,
    seed: int = 0,
    **params: object,
) -> dict[str, Tensor]:
    """mergekit's ``merge_group`` as its CPU run does it with ``dtype: bfloat16`` (or float16):
    the tensors loaded in ``dtype`` and every torch operation done on ``dtype`` tensors (torch
    computes each in f32 and rounds; sums over the models accumulate in f32), transcribed line by
    line. Sparsification keeps the same elements as :func:`sparsify` (masks are exact in any
    dtype); the L1 rescale is not transcribed (its bf16 norms are a whole-tensor reduction)."""
    kind, consensus, normalize, rescale = METHODS[method]
    normalize = bool(params.get("normalize", normalize))
    if bool(params.get("rescale", rescale)) and kind is not None:
        raise ValueError("the L1 rescale is not transcribed in a reduced dtype")
    out = {}
    for n, b0 in base.items():
        if n not in mergeable_names(base):
            out[n] = b0.clone()
            continue
        b = b0.to(dtype)
        deltas = []
        for t, m in enumerate(models):
            delta = m[n].to(dtype) - b
            if kind is not None:
                kept = sparsify(delta.float(), kind, per_task(params.get("density", 1.0), t),
                                per_task(params.get("gamma", 0.01), t), seed, t, n)  # fmt: skip
                delta = kept.to(dtype)
            deltas.append(delta)
        d = torch.stack(deltas)
        w = torch.tensor(list(weights), dtype=dtype)
        while d.dim() > w.dim():
            w = w.unsqueeze(-1)
        d = d * w
        if consensus:
            sign = d.sign()
            majority = (d.sum(dim=0) >= 0).to(dtype) * 2 - 1
            mask = sign == majority
            mixed = (d * mask).sum(dim=0)
            divisor = (w * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = d.sum(dim=0)
            divisor = w.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if normalize:
            mixed = mixed / divisor
        if lam != 1:
            mixed = mixed * lam
        out[n] = (b + mixed).to(dtype)
    return out


def permuted_vocabulary(tensors: dict[str, Tensor], perms: dict[str, dict[int, int]], vocab: dict[str, int],
                        tokens: dict[str, dict] | None, base: str | None,
                        pad_to_multiple_of: int | None = None) -> dict[str, Tensor]:  # fmt: skip
    """mergekit's ``PermutedVocabulary`` (``tokenizer/embed.py``), token by token as it is written:
    ``tensors`` maps each model (in the plan's order) to its vocabulary tensor, ``perms`` each
    model to {new id: old row or -1}; ``tokens``: token → {"source": model | {"kind": "zero"} |
    {"kind": "model_token", "model", "token_id"}, "force"}. Padding rows: the mean of the rows,
    in f64 here."""
    models = list(tensors)
    size = len(vocab)
    if pad_to_multiple_of and size % pad_to_multiple_of:
        size = (size // pad_to_multiple_of + 1) * pad_to_multiple_of
    shape = tensors[models[0]].shape[1:]
    dtype = tensors[models[0]].dtype
    for t in tensors.values():
        dtype = torch.promote_types(dtype, t.dtype)
    cfgs = dict(tokens or {})
    average = set()
    for token, i in vocab.items():  # assign_embedding_sources
        if token in cfgs:
            continue
        has = [perms[m][i] >= 0 for m in models]
        if sum(has) == 1:
            cfgs[token] = {"source": models[has.index(True)]}
        elif sum(has) == 0:
            cfgs[token] = {"source": {"kind": "zero"}}
        elif base in models and perms[base][i] >= 0:
            cfgs[token] = {"source": base}
        else:
            average.add(token)
    defaults = {}
    for token, i in vocab.items():
        cfg = cfgs.get(token)
        if not (cfg and cfg.get("force")) and all(perms[m][i] >= 0 for m in models):
            continue
        if token in average:
            e, n = torch.zeros(shape, dtype=dtype), 0
            for m in models:
                if perms[m][i] >= 0:
                    e = e + tensors[m][perms[m][i]].to(dtype)
                    n += 1
            e /= n
        else:
            src = cfg["source"]
            if isinstance(src, dict) and src.get("kind") == "zero":
                e = torch.zeros(shape, dtype=dtype)
            elif isinstance(src, dict):
                e = tensors[src["model"]][src["token_id"]].to(dtype)
            else:
                e = tensors[src][perms[src][i]].to(dtype)
        defaults[token] = e
    out = {}
    for m in models:
        new = torch.zeros((size, *shape), dtype=dtype)
        for token, i in vocab.items():
            force = bool(cfgs.get(token, {}).get("force")) if token in (tokens or {}) else False
            if perms[m][i] >= 0 and not force:
                new[i] = tensors[m][perms[m][i]].to(dtype)
            elif token in defaults:
                new[i] = defaults[token]
        if size > len(vocab):
            new[len(vocab):] = new[: len(vocab)].double().mean(0).to(dtype)
        out[m] = new
    return out


def model_stock_in_dtype(base: StateDict, models: Sequence[StateDict], dtype: torch.dtype,
                         filter_wise: bool = False) -> StateDict:  # fmt: skip
    """mergekit's ``model_stock_merge_method`` line by line in torch (``reference_mergekit_methods
    .model_stock`` with torch's own reductions), on tensors loaded in ``dtype``: every operation
    rounds as mergekit's run in that dtype does."""
    from .reference_mergekit_methods import model_stock

    return {name: model_stock(b.to(dtype), [m[name].to(dtype) for m in models], filter_wise)
            if b.is_floating_point() else b for name, b in base.items()}  # fmt: skip
