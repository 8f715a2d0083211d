"""Reports on one trial: why its plan is (not) faster, layer by layer (:func:`load_layers`,
``search show``), and the picture of it (:func:`plot_layers`)."""

from search.report._graph import entry_layer, layer_of_tensor, node_layers
from search.report._layers import (
    OTHER,
    layer_frame,
    layer_times,
    load_layers,
    unaccelerated,
)
from search.report._plot import plot_layers

__all__ = [
    "OTHER",
    "entry_layer",
    "layer_frame",
    "layer_of_tensor",
    "layer_times",
    "load_layers",
    "node_layers",
    "plot_layers",
    "unaccelerated",
]
