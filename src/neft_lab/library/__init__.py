"""neft_lab as a library: NeFT (neuron-level fine-tuning) in your own Hugging Face `Trainer`, TRL or torch script.

    from neft_lab import NeuronConfig, get_neuron_model, score_neurons, select_neurons

    scores = score_neurons(base_model, tuned_model)         # or gradient_neuron_scores(model, batches)
    neurons = select_neurons(scores, budget=0.09)           # or budget="paper_9", vectors=150_000
    model = get_neuron_model(base_model, NeuronConfig(neurons=neurons))
    model.print_trainable_parameters()
    ...train...; model.save_pretrained("adapter")            # only the selected vectors, indices, config, base hash
    model = NeuronModel.from_pretrained(base_model, "adapter")

Imports torch, transformers and safetensors only (no Hydra, omegaconf or Lightning). Not NEFTune (noisy
embeddings, transformers' `neftune_noise_alpha`): NeFT trains selected neurons, see the README.
"""

from neft_lab.library.neuron_model import NeuronConfig, NeuronModel, get_neuron_model
from neft_lab.library.scores import NeuronScores, gradient_neuron_scores, score_neurons, select_neurons
from neft_lab.neurons.neuron_set import NeuronSet

__all__ = [
    "NeuronConfig",
    "NeuronModel",
    "NeuronScores",
    "NeuronSet",
    "get_neuron_model",
    "gradient_neuron_scores",
    "score_neurons",
    "select_neurons",
]
