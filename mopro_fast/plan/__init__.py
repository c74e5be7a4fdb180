"""Planning a training run before a GPU is at hand (DESIGN.md section 4): measured training
images/s per GPU and the recipe's schedule -> a predicted wall time, phase by phase.

    figures = figures_from_option("benchmarks/results/h200-res-2026-12-03.json", cfg)   # or "3000"
    plan = predict(cfg, figures, Setup(gpus=8), recipe="recipes/rn50_fast_8gpu.yaml")
    print(plan.table())                                         # or plan.to_dict()

By concern:
    throughput.py  images/s per GPU by crop side: one number, or a `bench step / e2e / all / res` report
    predict.py     the time model: training phases by resolution, evaluation, checkpoints
`mopro-fast plan` (mopro_fast/cli/plan.py) is the command line. Light on purpose: no torch.
"""

from mopro_fast.plan.predict import SPLIT_IMAGES, WEBVISION_TRAIN, Phase, Plan, Setup, predict
from mopro_fast.plan.throughput import Figure, Figures, PlanError, figures_from_option, read_report

__all__ = ["SPLIT_IMAGES", "WEBVISION_TRAIN", "Figure", "Figures", "Phase", "Plan", "PlanError", "Setup",
           "figures_from_option", "predict", "read_report"]
