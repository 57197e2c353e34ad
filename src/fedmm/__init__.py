"""fedmm: federated parameter-efficient finetuning of multimodal foundation models."""

__version__ = "0.2.1"
