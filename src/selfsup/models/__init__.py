"""Backbones and heads in plain torch."""

from selfsup.models.backbones import BACKBONES, Backbone, BackboneSpec, build_backbone
from selfsup.models.heads import MLP

__all__ = ["BACKBONES", "MLP", "Backbone", "BackboneSpec", "build_backbone"]
