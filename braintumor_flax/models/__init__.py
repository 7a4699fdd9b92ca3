"""Flax NNX models: the VGG16 trunk and the two classifiers built on it."""

from braintumor_flax.models.classifiers import ModelConfig, TumorClassifier, ViewClassifier, build_model
from braintumor_flax.models.vgg16 import VGG16, VGG16_LAYERS, caffe_preprocess

__all__ = [
    "VGG16",
    "VGG16_LAYERS",
    "ModelConfig",
    "TumorClassifier",
    "ViewClassifier",
    "build_model",
    "caffe_preprocess",
]
