"""The Python API: validates and normalises arguments, then hands owned values to the Rust core.

File paths go to Rust as paths (tensors never cross into Python); in-memory state dicts go as
zero-copy buffers. Nothing here loops over tensor elements.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import _rust
from . import cluster as _cluster
from ._rust import ParamError
from .job import MAX_LAMBDAS, PoolArg, SearchArg, _f32_checked, _is_number, _job, as_bool, parse_lambdas  # noqa: F401

METHODS = ("task_arithmetic", "linear", "magmax", "dare", "dare_ties", "ties", "breadcrumbs", "pcb", "tsv", "iso_c",
           "iso_cts", "wudi")  # fmt: skip
SVD_METHODS = ("tsv", "iso_c", "iso_cts", "wudi")
#: mergekit 0.1.5's other methods: mergekit's semantics only (``compat`` may be omitted).
MERGEKIT_ONLY = ("slerp", "nuslerp", "multislerp", "karcher", "nearswap", "passthrough", "model_stock", "della",
                 "della_linear", "sce", "ram", "ramplus_tl", "arcee_fusion")  # fmt: skip
from .job import POOLS  # noqa: E402,F401

PathLike = str | os.PathLike
ProgressFn = Callable[[int, int], object]

_NP_TO_ST = {
    "float32": "F32",
    "float16": "F16",
    "float64": "F64",
    "bfloat16": "BF16",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "bool": "BOOL",
}
_ST_TO_NP = {v: k for k, v in _NP_TO_ST.items() if k != "bfloat16"}
# FP8 travels as its byte codes; ml_dtypes names its numpy types.
_FP8 = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _torch_fp8() -> dict[Any, str]:
    try:
        import torch
    except ImportError:
        return {}
    return {torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


@dataclass(frozen=True)
class Report:
    """What a finished merge did.

    Attributes:
        outputs: The files written (weights, index and copied config files).
        bytes_read: Bytes of tensor data read, summed over every pass over the inputs.
        bytes_written: Bytes of safetensors written.
        seconds: Wall time of the whole call.
        differing: Integer/bool tensors that differ between the base and a fine-tune (they are
            copied from the base, never merged; a :class:`CopiedTensorsWarning` says so too).
        skipped: Files of the base's model directory not copied next to the output, each with
            why (weights in another format, a training log, over 512 MiB, nested too deep).
        aligned: Per fine-tune whose tensor names were aligned to the base's (a leading component
            such as ``bert.`` or DDP's ``module.`` removed or added), what was done (an
            :class:`AlignedNamesWarning` says so).
        kept: Tensors ``keep_base`` copied from the base (a :class:`KeptBaseWarning` says so).
        left_out: Tensors only models held that ``keep_base`` left out.
    """

    outputs: list[str]
    bytes_read: int
    bytes_written: int
    seconds: float
    differing: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    aligned: list[str] = field(default_factory=list)


class CopiedTensorsWarning(UserWarning):
    """Integer or bool tensors differ between the base and a fine-tune: they were copied from the
    base, not merged (BatchNorm counters legitimately differ; token ids should not)."""


class KeptBaseWarning(UserWarning):
    """``keep_base`` copied tensors from the base (and left models' own out): the run names them."""


class AlignedNamesWarning(UserWarning):
    """A fine-tune's tensor names were aligned to the base's by a leading component (``bert.``,
    ``module.``): the run says which, so a wrong alignment is never silent."""


def _warn_aligned(lines: list[str]) -> None:
    for line in lines:
        warnings.warn(f"tensor names aligned to the base's: {line}", AlignedNamesWarning, stacklevel=4)


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _warn_kept(kept: list[str], left_out: list[str]) -> None:
    if kept or left_out:
        said = [f"copied {len(kept)} tensor(s) from the base: {_shown(kept)}"] if kept else []
        said += [f"left out {len(left_out)} tensor(s) only models hold: {_shown(left_out)}"] if left_out else []
        warnings.warn("keep_base " + "; ".join(said), KeptBaseWarning, stacklevel=4)


def _warn_differing(names: list[str]) -> None:
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        warnings.warn(
            f"{len(names)} integer/bool tensor(s) differ between the base and a fine-tune and were copied from the "
            f"base, not merged: {shown}",
            CopiedTensorsWarning,
            stacklevel=4,
        )


DESCRIPTIONS = {
    "task_arithmetic": "Σ_t τ_t",
    "linear": "weighted average of the fine-tunes (a model soup): Σ w_t τ_t / Σ w_t",
    "magmax": "per element the τ_t of largest |τ_t|",
    "dare": "Σ_t of randomly dropped, rescaled τ_t",
    "dare_ties": "TIES on DARE-dropped τ_t",
    "ties": "trim, elect sign, disjoint mean (exact)",
    "breadcrumbs": "per row: drop the largest γ, keep the next β",
    "pcb": "balanced weighted mean of clamped deltas",
    "tsv": "Task Singular Vectors on 2-D tensors (torch)",
    "iso_c": "isotropic spectrum of Σ τ_t on 2-D tensors (torch)",
    "iso_cts": "Iso-C's common subspace plus each task's own directions, isotropic spectrum, on 2-D tensors (torch)",
    "wudi": "Σ τ_t refined by Adam to cut each task's interference ‖(M − τ_t) τ_tᵀ‖², on 2-D tensors (torch)",
    "slerp": "spherical interpolation base → one model at t, per tensor (mergekit)",
    "nuslerp": "slerp of two models (of their deltas with a base) at w_2/(w_1+w_2), per tensor/row/column (mergekit)",
    "multislerp": "barycentric interpolation of T models on the hypersphere, per tensor (mergekit)",
    "karcher": "Karcher mean of the models' directions, scaled by their mean norm, per tensor (mergekit)",
    "nearswap": "per element, the base moved toward the model by t/|θ − θ_base| (mergekit)",
    "passthrough": "one model as it is, or times scale (mergekit)",
    "model_stock": "base ↔ average of the models by their mean pairwise cosine, per tensor or row (mergekit)",
    "della": "DELLA: rank-based random drop per row, rescale, TIES sign consensus (mergekit)",
    "della_linear": "DELLA without the sign consensus (mergekit)",
    "sce": "select by variance, weights from mean squares, erase minority signs (mergekit)",
    "ram": "per element: unique changes kept, shared ones averaged (mergekit)",
    "ramplus_tl": "RAM with unique changes boosted by the tensor's shared/unique ratio (mergekit)",
    "arcee_fusion": "the model's changes where importance ≥ median + 1.5·IQR of the tensor (mergekit)",
}


def describe_methods() -> list[dict[str, Any]]:
    """Every method with its parameters and their defaults, the default λ of a plain merge and the
    default search space Λ of Weight Weaving."""
    out = []
    for m in METHODS + MERGEKIT_ONLY:
        params = dict(_rust.default_params(m))
        if m in SVD_METHODS:
            params.update({"svd_exclude": None, "device": "cuda if available, else cpu"})
        lams = default_lambdas(m)
        var = _rust.search_variable(m)
        text = f"{lams[0]:.1f}:{lams[-1]:.1f}:0.1"
        out.append({"method": m, "description": DESCRIPTIONS[m], "params": params, "lam": _rust.default_lam(m),
                    "lambdas": lams, "search_variable": var or "lam",
                    "lambdas_text": f"{var} in {text} (λ = 1)" if var else text})  # fmt: skip
    return out


def default_lambdas(method: str) -> list[float]:
    """The paper's default search space Λ for ``method`` (step 0.1, both ends included).

    Raises:
        ParamError: for an unknown method.
    """
    if not isinstance(method, str):
        raise ParamError(f"method must be a string, got {type(method).__name__}")
    lams = _rust.default_lambdas(method)
    if lams is None:
        raise ParamError(f"unknown method '{method}' (known: {', '.join(METHODS)})")
    return lams


def _path(p: object, name: str) -> str:
    """A path argument as a str: str, bytes and os.PathLike are accepted."""
    if isinstance(p, bytes):
        return os.fsdecode(p)
    if isinstance(p, (str, os.PathLike)):
        v = os.fspath(p)
        return os.fsdecode(v) if isinstance(v, bytes) else v
    raise ParamError(f"{name} must be a path (str or os.PathLike), got {type(p).__name__}")


def _models(models: object) -> list[Any]:
    if isinstance(models, (str, bytes, os.PathLike, Mapping)):
        raise ParamError("models must be a sequence of fine-tuned models, not a single one")
    try:
        out = list(models)  # type: ignore[call-overload]
    except TypeError:
        raise ParamError(f"models must be a sequence, got {type(models).__name__}") from None
    if not out:
        raise ParamError("models: at least one fine-tuned model is needed")
    return out


def _report(d: dict[str, Any]) -> Report:
    _warn_differing(d["differing"])
    _warn_aligned(d.get("aligned", []))
    _warn_kept(d.get("kept", []), d.get("left_out", []))
    return Report(d["outputs"], d["bytes_read"], d["bytes_written"], d["seconds"], d["differing"], d["skipped"],
                  d.get("kept", []), d.get("left_out", []), d.get("aligned", []))  # fmt: skip


def _svd_options(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """Pops the torch backend's own options (``device``, ``svd_exclude``) off ``params``."""
    if method not in SVD_METHODS:
        return {}
    return {k: params.pop(k) for k in ("device", "svd_exclude") if k in params}


def _backend():
    try:
        from . import torch_backend
    except ImportError as e:
        raise ParamError(f"tsv, iso_c, iso_cts and wudi need torch ({e}); install weightweave[torch]") from None
    return torch_backend


def _progress(progress: object) -> ProgressFn | None:
    if progress is not None and not callable(progress):
        raise ParamError(f"progress must be callable as progress(done, total), got {type(progress).__name__}")
    return progress  # type: ignore[return-value]


def _run_files(base, models, out, job: dict[str, Any], shard_size, overwrite, progress, cluster=None) -> Report:
    if base is None:
        # A model soup needs no base: Σ w_t θ_t / Σ w_t is the same over any reference point, so
        # the first model serves as one (its delta is 0).
        if job["method"] != "linear" or job["mode"] != "merge" or job["lam"] not in (None, 1.0):
            raise ParamError("base is required (only a plain linear merge, a model soup, can do without one)")
        base = _models(models)[0]
    args = (_path(base, "base"), [_path(m, f"models[{i}]") for i, m in enumerate(_models(models))], _path(out, "out"))
    if shard_size is not None and (not isinstance(shard_size, int) or isinstance(shard_size, bool)
                                   or not 0 < shard_size < 2**64):  # fmt: skip
        raise ParamError(f"shard_size must be a positive number of bytes below 2^64, got {shard_size!r}")
    progress = _progress(progress)
    svd = _svd_options(job["method"], job["params"])
    opts = {"shard_size": shard_size, "overwrite": as_bool("overwrite", overwrite)}
    if _cluster.parse(cluster) is not None:
        if job["method"] in SVD_METHODS:
            _backend().svd_targets([], svd.get("svd_exclude"))  # torch here too, and the pattern checked
            return _report(_cluster.run(*args, job, opts, progress, cluster, svd=svd))
        return _report(_cluster.run(*args, job, opts, progress, cluster))
    if job["method"] in SVD_METHODS:
        backend = _backend()
        backend.check_options(**svd)
        sess = _rust.Session(*args, job, **opts)
        return _report(backend.run_session(sess, job["method"], progress=progress, weights=job["weights"],
                                           params=job["params"], threads=job.get("threads"), **svd))  # fmt: skip
    return _report(_rust.merge_files(*args, job, **opts, progress=progress))


def _default_modules(base: PathLike | None, params: dict[str, Any]) -> None:
    """``modules`` from the base directory's architecture, unless given (``modules.py``)."""
    if "modules" in params or not isinstance(base, (str, os.PathLike)):
        return  # a base of the wrong type is reported where it is opened
    from .modules import table

    try:
        mods = table(os.fspath(base))
    except (TypeError, ValueError, OSError):
        return
    if mods is not None:
        params["modules"] = mods


def merge(
    base: PathLike | None,
    models: Sequence[PathLike],
    out: PathLike,
    *,
    method: str,
    lam: float | str | None = None,
    seed: int = 0,
    threads: int | None = None,
    chunk_size: int | None = None,
    out_dtype: str | None = None,
    shard_size: int | None = None,
    overwrite: bool = False,
    weights: Sequence[float] | str | None = None,
    compat: str | None = None,
    keep_base: str | None = None,
    progress: ProgressFn | None = None,
    cluster: str | None = None,
    **params: float | bool | str | Sequence[float],
) -> Report:
    """Merge fine-tuned checkpoints into θ_pre + λ·M, streaming from disk to disk.

    Args:
        base: The pre-trained checkpoint: a ``.safetensors`` file, a model directory, or a
            ``model.safetensors.index.json``. ``None`` only for ``linear`` (a model soup), whose
            structure and dtypes then come from the first model.
        models: The fine-tuned checkpoints (same tensors and shapes as the base).
        out: A ``.safetensors`` file, or a directory (sharded with ``shard_size``; the base
            directory's config files are copied in).
        method: One of ``METHODS``, or of ``MERGEKIT_ONLY`` (mergekit's other methods, with mergekit's
            semantics and parameter names: ``slerp`` takes ``t``, ``model_stock`` ``filter_wise``, ...).
        lam: The scaling factor λ (default: 0.3 for task_arithmetic, 0.5 for magmax, else 1.0), or
            ``"metagpt"``: MetaGPT's closed form, per-task weights λ_t = ‖τ_t‖² / Σ_k ‖τ_k‖² (exact
            norms over the whole model, one more read of the inputs) with λ = 1.
        seed: Seed of the counter-based generator (DARE masks).
        threads: Worker threads (default: all cores); for the SVD methods, torch's threads too
            (default: torch's), since LAPACK's SVD changes in its last bits with their number.
        chunk_size: Elements per chunk (default 131072); memory is O(chunk_size × threads × T).
        out_dtype: ``"f32"``, ``"f16"``, ``"bf16"`` or ``"f64"`` for merged tensors
            (default: the base's dtype).
        shard_size: Maximum bytes per output shard (directory output only).
        overwrite: Replace an earlier weightweave output at ``out`` (without it, an existing
            file or non-empty directory is an error). Only outputs weightweave wrote are ever
            replaced, atomically.
        weights: One weight per fine-tune: every method, and Weight Weaving's A*, use w_t·τ_t
            in place of τ_t (mergekit's per-model ``weight``; may be negative or zero); or
            ``"metagpt"`` for MetaGPT's λ_t as the weights.
        compat: ``"mergekit"`` computes mergekit's version of the method (its names and
            semantics: per-tensor sparsification, weights after it, normalized sign consensus;
            see the README's semantics table); default: the papers' semantics of SPEC.md.
        keep_base: A regular expression (Python's ``re.search``) naming tensors the base and the
            models do not all share, such as a classification head of another size: the output
            takes the base's, copied as they are, and a model's own are left out. Without it such
            tensors are an error that lists them all (none is guessed). The report's ``kept`` and
            ``left_out`` and the output's metadata say which.
        progress: Called as ``progress(bytes_done, bytes_total)`` about every 100 ms;
            raising from it cancels the merge.
        cluster: ``"ray"`` spreads the merge over a Ray cluster's CPUs, and GPUs for the SVD
            methods (the runtime already initialised, else ``RAY_ADDRESS``, else a local one;
            ``"ray:ADDRESS"`` connects to ADDRESS), with the same output bit for bit. Inputs and
            ``out``'s directory must be on a file system every node sees (checked before any
            work). Needs
            ``weightweave[ray]``; see the README's "Beyond one machine".
        **params: Method parameters: ``density``, ``gamma``, ``ratio``, ``scope``,
            ``rescale``, ``ties_density`` (see the README's method table); ``density`` and
            ``gamma`` may be lists, one value per fine-tune. LiNeS, with any method:
            ``lines=True`` scales M in block ℓ of L by α + λ·(ℓ − 1)/(L − 1) and elsewhere by α
            (λ is LiNeS's β); ``lines_alpha`` (default ``"auto"``: ‖Σ_t τ'_t‖₁ / (T·‖M‖₁), one
            more pass), ``lines_blocks`` (default: one more than the largest block index in the
            names; a name's block is its first integer component, ``layers.7.``).
            Per tensor (mergekit's gradients and filters): a parameter, ``lam`` or an entry of a
            per-model list may be a setting, ``{"value": [0.2, 0.8]}`` (a gradient over the
            layers) or ``[{"filter": "mlp", "value": 0.3}, {"value": 0.5}]`` (the first condition
            whose filter is in the tensor's name); see the README's recipe section. A gradient
            runs over the layers of the tensor's module: ``modules=[{"name", "prefixes",
            "layered", "pins"}, ...]``, by default the modules mergekit knows for the base
            directory's ``config.json`` architecture (vision-language models, T5); a condition's
            ``"module": name`` holds in that module only.

    Returns:
        A :class:`Report`.

    Raises:
        WeaveError: any problem with the inputs, parameters or output (subclasses name it);
            nothing is left at ``out`` when it is raised.
    """
    _default_modules(base, params)
    job = _job(method, params, "merge", lam=lam, seed=seed, threads=threads, chunk_size=chunk_size,
               out_dtype=out_dtype, weights=weights, compat=compat, keep_base=keep_base)  # fmt: skip
    return _run_files(base, models, out, job, shard_size, overwrite, progress, cluster)


def weave(
    base: PathLike,
    models: Sequence[PathLike],
    out: PathLike,
    *,
    method: str,
    lambdas: Sequence[float] | str | None = None,
    search: SearchArg | None = None,
    pool: PoolArg = "mean",
    include_deltas: bool = True,
    seed: int = 0,
    threads: int | None = None,
    chunk_size: int | None = None,
    out_dtype: str | None = None,
    shard_size: int | None = None,
    overwrite: bool = False,
    weights: Sequence[float] | str | None = None,
    compat: str | None = None,
    keep_base: str | None = None,
    progress: ProgressFn | None = None,
    cluster: str | None = None,
    **params: float | bool | str | Sequence[float],
) -> Report:
    """Weight Weaving: θ_pre + pool([τ_1..τ_T] + [λ·M for λ in Λ]), without building that stack.

    Args:
        lambdas: The search space Λ, strictly increasing: a sequence, ``"start:stop:step"`` or
            ``"a,b,c"`` (default: the paper's range for the method, see ``default_lambdas``).
            Shorthand for ``search={"lam": lambdas}``.
        search: A search space over any numeric parameter: a grid such as
            ``{"lam": "0.1:1.0:0.1", "density": [0.1, 0.2, 0.3]}`` (the Cartesian product,
            the first name outermost; without ``lam``, the default Λ is the first axis) or a
            list of points such as ``[{"lam": 0.5, "density": 0.2}, ...]`` (each sets ``lam``).
            A point may set ``weights`` (a vector for M only; A*'s deltas keep ``weights``), and
            with ``lines=True`` its own ``lines_alpha`` (its λ is LiNeS's β).
            M is computed once per distinct parameter set, all in the same passes.
        pool: ``"mean"``, ``"random"``, ``"magmax"``, or a function ``f(A) -> P``: ``A`` is one
            block of A* as a float32 numpy array of shape (N, n) (rows in A* order: the deltas,
            then λ_p·M_p in point order; columns consecutive elements of one tensor), ``P`` its
            n pooled values. It is called with the GIL held, from worker threads, once per
            block, blocks in no particular order; the result is as deterministic as ``f`` is
            column by column. An exception in it aborts the run with nothing written.
        include_deltas: Pool over the task vectors too (the paper's default).
        Other arguments as in :func:`merge`.

    Returns:
        A :class:`Report`.

    Raises:
        WeaveError: as in :func:`merge`.
    """
    _default_modules(base, params)
    job = _job(method, params, "weave", lambdas=lambdas, pool=pool, include_deltas=include_deltas, seed=seed,
               threads=threads, chunk_size=chunk_size, out_dtype=out_dtype, weights=weights, search=search,
               compat=compat, keep_base=keep_base)  # fmt: skip
    return _run_files(base, models, out, job, shard_size, overwrite, progress, cluster)


def inspect(path: PathLike) -> dict[str, Any]:
    """Summarise a checkpoint without reading its tensors.

    Returns:
        A dict with ``path``, ``files``, ``metadata``, ``num_params``, ``data_bytes`` and
        ``tensors`` (each with ``name``, ``dtype``, ``shape``, ``bytes``, ``file``, ``merged``).

    Raises:
        WeaveError: if the checkpoint is missing or malformed.
    """
    return _rust.inspect(_path(path, "path"))


# ---- in-memory state dicts -------------------------------------------------------------------


def _is_torch(v: object) -> bool:
    return type(v).__module__.split(".")[0] == "torch"


def _entries(sd: Mapping[str, Any], label: str) -> list[tuple[str, str, list[int], Any]]:
    import numpy as np

    if not isinstance(sd, Mapping):
        raise ParamError(f"{label} must be a mapping of tensor names to arrays")
    out = []
    for name, v in sd.items():
        if not isinstance(name, str):
            # str() would make 1 and "1" one tensor, and one of them would be lost.
            raise ParamError(f"{label}: tensor names must be strings, got {name!r}")
        if _is_torch(v):
            import torch

            if not isinstance(v, torch.Tensor):
                raise ParamError(f"{label}: '{name}' is a {type(v).__name__}, not a tensor")
            if v.is_quantized:
                raise ParamError(f"{label}: tensor '{name}' is quantized ({v.dtype}): dequantize it first "
                                 "(packed quantized weights are never merged as they are)")  # fmt: skip
            try:
                # Lazy negation/conjugation flags are resolved into the values they stand for.
                t = v.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
            except (NotImplementedError, RuntimeError) as e:
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ParamError(f"{label}: tensor '{name}' on device {v.device} cannot be read: {first}") from None
            if t.dtype == torch.bfloat16:
                arr, dt = t.view(torch.int16).numpy(), "BF16"
            elif t.dtype in _torch_fp8():
                arr, dt = t.view(torch.uint8).numpy(), _torch_fp8()[t.dtype]
            else:
                arr = t.numpy()
                dt = _NP_TO_ST.get(arr.dtype.name)
        else:
            try:
                arr = np.asarray(v)
            except Exception as e:  # noqa: BLE001 - any object can fail to convert
                raise ParamError(f"{label}: tensor '{name}' is not an array ({type(v).__name__}: {e})") from None
            if not arr.dtype.isnative:
                # The engine reads little-endian bytes: a big-endian array is converted, not misread.
                arr = arr.astype(arr.dtype.newbyteorder("="))
            dt = _NP_TO_ST.get(arr.dtype.name)
            if dt == "BF16":
                arr = arr.view(np.uint16)
        if dt is None:
            raise ParamError(f"{label}: tensor '{name}': unsupported dtype {arr.dtype}")
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")
        # Rust gets a flat view: the shape travels separately, and 0-d buffers have no shape.
        out.append((str(name), dt, list(arr.shape), arr.reshape(-1)))
    return out


def _run_arrays(base, models, job: dict[str, Any], progress) -> dict[str, Any]:
    # numpy only here: importing it starts BLAS threads that would compete with file merges.
    import numpy as np

    progress = _progress(progress)
    if not isinstance(base, Mapping):
        raise ParamError("base must be a mapping of tensor names to arrays")
    models = _models(models)
    svd = _svd_options(job["method"], job["params"])
    as_torch = any(_is_torch(v) for v in base.values())
    b = _entries(base, "base")
    ms = [_entries(m, f"models[{i}]") for i, m in enumerate(models)]
    plan = _rust.plan_buffers(b, ms, job)
    outputs = {}
    for name, dt, shape in plan:
        storage = np.uint16 if dt == "BF16" else np.uint8 if dt in _FP8 else np.dtype(_ST_TO_NP[dt])
        outputs[name] = (dt, np.empty(shape, dtype=storage))
    given = None
    if job["method"] in SVD_METHODS:
        import torch

        def as_torch(sd: Mapping[str, Any]) -> dict[str, Any]:
            return {k: v if _is_torch(v) else torch.from_numpy(np.asarray(v)) for k, v in sd.items()}

        ms_t = [as_torch(m) for m in models]
        if job["metagpt"]:
            # The core finds MetaGPT's weights (exact norms) before any M is computed here.
            job = {**job, "weights": _rust.metagpt_buffers(b, ms, job), "metagpt": False}
        m_by_name = _backend().merged_tensors(as_torch(base), ms_t, job["method"], weights=job["weights"],
                                              params=job["params"], **svd)  # fmt: skip
        given = [(n, t.numpy().reshape(-1)) for n, t in m_by_name.items()]
    flat_outputs = [(n, a.reshape(-1)) for n, (_, a) in outputs.items()]
    differing, aligned = _rust.merge_buffers(b, ms, flat_outputs, job, progress=progress, given=given)
    _warn_aligned(aligned)
    _warn_differing(differing)
    if as_torch:
        import torch

        res = {}
        views = {"BF16": torch.bfloat16, **{v: k for k, v in _torch_fp8().items()}}
        for n, (dt, a) in outputs.items():
            t = torch.from_numpy(a)
            res[n] = t.view(views[dt]) if dt in views else t
        return res
    res = {}
    for n, (dt, a) in outputs.items():
        if dt == "BF16" or dt in _FP8:
            try:
                import ml_dtypes
            except ImportError:
                raise ParamError(f"{dt} output from numpy inputs needs ml_dtypes; pass torch tensors instead") from None
            a = a.view(ml_dtypes.bfloat16 if dt == "BF16" else getattr(ml_dtypes, _FP8[dt]))
        res[n] = a
    return res


def merge_arrays(
    base: Mapping[str, Any],
    models: Sequence[Mapping[str, Any]],
    *,
    method: str,
    lam: float | str | None = None,
    seed: int = 0,
    threads: int | None = None,
    chunk_size: int | None = None,
    out_dtype: str | None = None,
    weights: Sequence[float] | str | None = None,
    compat: str | None = None,
    keep_base: str | None = None,
    progress: ProgressFn | None = None,
    **params: float | bool | str | Sequence[float],
) -> dict[str, Any]:
    """:func:`merge` on in-memory state dicts of numpy arrays or torch tensors.

    Returns the same kind it was given (torch tensors on CPU, or numpy arrays), computed by the
    same Rust engine with the inputs shared zero-copy where their layout allows.
    """
    job = _job(method, params, "merge", lam=lam, seed=seed, threads=threads, chunk_size=chunk_size,
               out_dtype=out_dtype, weights=weights, compat=compat, keep_base=keep_base)  # fmt: skip
    return _run_arrays(base, models, job, progress)


def weave_arrays(
    base: Mapping[str, Any],
    models: Sequence[Mapping[str, Any]],
    *,
    method: str,
    lambdas: Sequence[float] | str | None = None,
    search: SearchArg | None = None,
    pool: PoolArg = "mean",
    include_deltas: bool = True,
    seed: int = 0,
    threads: int | None = None,
    chunk_size: int | None = None,
    out_dtype: str | None = None,
    weights: Sequence[float] | str | None = None,
    compat: str | None = None,
    keep_base: str | None = None,
    progress: ProgressFn | None = None,
    **params: float | bool | str | Sequence[float],
) -> dict[str, Any]:
    """:func:`weave` on in-memory state dicts of numpy arrays or torch tensors."""
    job = _job(method, params, "weave", lambdas=lambdas, pool=pool, include_deltas=include_deltas, seed=seed,
               threads=threads, chunk_size=chunk_size, out_dtype=out_dtype, weights=weights, search=search,
               compat=compat, keep_base=keep_base)  # fmt: skip
    return _run_arrays(base, models, job, progress)
