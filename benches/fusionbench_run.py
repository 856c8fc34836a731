"""Runs one FusionBench 0.2.33 algorithm as its users do (the algorithm class's ``run`` on a
``BaseModelPool`` of transformers models loaded with ``from_pretrained``) and saves the merged
state dict as safetensors. Executed by ``fusionbench_compare.py`` with FusionBench's own venv;
imports nothing of weightweave.

    python fusionbench_run.py METHOD PARAMS_JSON OUT BASE FT [FT ...]
"""

from __future__ import annotations

import json
import logging
import sys
import warnings

import torch


def algorithm(method: str, p: dict):
    """FusionBench's class for `method`, configured as ``fusionbench_compare.py`` asks."""
    from fusion_bench.method.dare.task_arithmetic import DareTaskArithmetic
    from fusion_bench.method.dare.ties_merging import DareTiesMerging
    from fusion_bench.method.isotropic_merging.iso import (
        IsotropicMergingInCommonAndTaskSubspace,
        IsotropicMergingInCommonSubspace,
    )
    from fusion_bench.method.magmax.magmax import MagMaxAlgorithm
    from fusion_bench.method.model_stock.model_stock import ModelStock
    from fusion_bench.method.task_arithmetic.task_arithmetic import TaskArithmeticAlgorithm
    from fusion_bench.method.task_singular_vector.TSVM import TaskSingularVectorMerging
    from fusion_bench.method.ties_merging.ties_merging import TiesMergingAlgorithm
    from fusion_bench.method.weighted_average.weighted_average import WeightedAverageAlgorithm
    from fusion_bench.method.wudi.wudi import WUDIMerging

    ties = {"threshold": p.get("threshold", 20), "remove_keys": [], "merge_func": p.get("merge_func", "mean")}
    return {
        "task_arithmetic": lambda: TaskArithmeticAlgorithm(scaling_factor=p["lam"]),
        "ties": lambda: TiesMergingAlgorithm(scaling_factor=p["lam"], **ties),
        "dare": lambda: DareTaskArithmetic(scaling_factor=p["lam"], sparsity_ratio=p["sparsity"],
                                           only_on_linear_weights=False, rescale=True),
        "dare_ties": lambda: DareTiesMerging(sparsity_ratio=p["sparsity"], only_on_linear_weights=False, rescale=True,
                                             scaling_factor=p["lam"], **ties),
        "magmax": lambda: MagMaxAlgorithm(scaling_factor=p["lam"]),
        "tsv": lambda: TaskSingularVectorMerging(alpha=p["lam"]),
        "iso_c": lambda: IsotropicMergingInCommonSubspace(scaling_factor=p["lam"]),
        "iso_cts": lambda: IsotropicMergingInCommonAndTaskSubspace(
            scaling_factor=p["lam"], common_space_fraction=p["common_space_fraction"]),
        "wudi": lambda: WUDIMerging(iter_num=p["steps"]),
        "model_stock": lambda: ModelStock(),
        "weighted_average": lambda: WeightedAverageAlgorithm(normalize=True, weights=p["weights"], verbose=False),
    }[method]()  # fmt: skip


def main() -> None:
    method, params, out, base, *fts = sys.argv[1:]
    p = json.loads(params)
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    torch.manual_seed(p.get("seed", 0))
    from fusion_bench.modelpool import BaseModelPool
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    def load(d: str):
        return AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32)

    models = {"_pretrained_": load(base), **{f"ft{i}": load(f) for i, f in enumerate(fts)}}
    if method == "weighted_average":
        models.pop("_pretrained_")  # FusionBench's weighted average has no base
    merged = algorithm(method, p).run(BaseModelPool(models))
    sd = {k: v.detach().contiguous() for k, v in merged.state_dict().items()}
    # Tied weights share storage: safetensors wants one name per storage.
    seen: dict[int, str] = {}
    for k in list(sd):
        ptr = sd[k].data_ptr()
        if ptr in seen:
            sd[k] = sd[k].clone()
        seen[ptr] = k
    save_file(sd, out)


if __name__ == "__main__":
    main()
