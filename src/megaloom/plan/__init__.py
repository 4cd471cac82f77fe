"""Capacity planning: parameters, memory per GPU, FLOPs and training time of a model on a
parallel layout, without building it (`megaloom plan`). The trainer imports the GPU table
(`detect_peak_flops`) and the FLOPs convention (`model_flops_per_token`) from here so its MFU
matches the planner's.
"""

from megaloom.plan.estimate import Plan, estimate
from megaloom.plan.flops import bubble_fraction, hardware_flops_per_token, model_flops_per_token
from megaloom.plan.gpus import GPUS, GPUSpec, detect_peak_flops, get_gpu
from megaloom.plan.layout import Layout, PlanError
from megaloom.plan.params import count_parameters, stage_parameters
from megaloom.plan.search import search

__all__ = [
    "GPUS",
    "GPUSpec",
    "Layout",
    "Plan",
    "PlanError",
    "bubble_fraction",
    "count_parameters",
    "detect_peak_flops",
    "estimate",
    "get_gpu",
    "hardware_flops_per_token",
    "model_flops_per_token",
    "search",
    "stage_parameters",
]
