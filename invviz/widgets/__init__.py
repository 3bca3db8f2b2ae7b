"""Jupyter widgets on top of the engine's job API: Explorer, NeuronPicker, ChannelGallery, RestartsView."""

from .explorer import Explorer
from .gallery import ChannelGallery
from .picker import NeuronPicker
from .restarts import RestartsView

__all__ = ["ChannelGallery", "Explorer", "NeuronPicker", "RestartsView"]
