"""Evaluation of frozen backbones: linear probing (fast and paper protocols) and few-shot episodes."""
from trainer.eval.backbones import BackboneSpecError, EvalBackbone, load_eval_backbone
from trainer.eval.fewshot import FewShotConfig, fewshot_eval, mean_confidence_interval
from trainer.eval.imagefolder import ImageFolderDataset, ImageFolderError
from trainer.eval.linear import FastProbeConfig, PaperProbeConfig, fast_linear_probe, paper_linear_probe
from trainer.eval.probe import fewshot_probe, linear_probe

__all__ = [
    "BackboneSpecError", "EvalBackbone", "load_eval_backbone",
    "FewShotConfig", "fewshot_eval", "mean_confidence_interval",
    "ImageFolderDataset", "ImageFolderError",
    "FastProbeConfig", "PaperProbeConfig", "fast_linear_probe", "paper_linear_probe",
    "fewshot_probe", "linear_probe",
]
