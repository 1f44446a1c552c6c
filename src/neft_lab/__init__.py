"""neft_lab: neuron-level fine-tuning (NeFT) of causal language models.

The library API (`neft_lab.library`) is importable from here, loaded on first use so that `import neft_lab` stays
light (the CLI's config checks run before torch is imported)::

    from neft_lab import NeuronConfig, get_neuron_model, score_neurons, select_neurons
"""

__version__ = "0.1.0"

# `neft_lab.library.__all__`, spelled out so that `import neft_lab` imports no torch (tests/test_layers.py keeps
# the two equal)
_LIBRARY = (
    "NeuronConfig",
    "NeuronModel",
    "NeuronScores",
    "NeuronSet",
    "get_neuron_model",
    "gradient_neuron_scores",
    "score_neurons",
    "select_neurons",
)
__all__ = ["__version__", *_LIBRARY]


def __getattr__(name: str):
    if name in _LIBRARY:
        from neft_lab import library

        return getattr(library, name)
    raise AttributeError(f"module 'neft_lab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LIBRARY))
