"""Evaluation of frozen backbones: linear probing (fast and paper protocols), weighted k-NN and few-shot episodes."""
from trainer.eval.backbones import BackboneSpecError, EvalBackbone, load_eval_backbone
from trainer.eval.fewshot import FewShotConfig, fewshot_eval, mean_confidence_interval
from trainer.eval.imagefolder import ImageFolderDataset, ImageFolderError
from trainer.eval.knn import KnnConfig, knn_class_scores, knn_eval
from trainer.eval.linear import FastProbeConfig, PaperProbeConfig, fast_linear_probe, paper_linear_probe
from trainer.eval.probe import fewshot_probe, knn_probe, linear_probe

__all__ = [
    "BackboneSpecError", "EvalBackbone", "load_eval_backbone",
    "FewShotConfig", "fewshot_eval", "mean_confidence_interval",
    "ImageFolderDataset", "ImageFolderError",
    "KnnConfig", "knn_class_scores", "knn_eval",
    "FastProbeConfig", "PaperProbeConfig", "fast_linear_probe", "paper_linear_probe",
    "fewshot_probe", "knn_probe", "linear_probe",
]
