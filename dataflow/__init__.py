"""dataflow: online, disaggregated training of EAGLE3 draft models."""

__version__ = "0.1.0"
