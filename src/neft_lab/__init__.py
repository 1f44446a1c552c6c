"""neft_lab: neuron-level fine-tuning (NeFT) of causal language models."""

__version__ = "0.1.0"
