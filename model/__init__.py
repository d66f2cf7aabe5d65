"""The AlexNet model family: `build_model(name, num_classes)`, `load_weights`, `MODEL_NAMES`."""
from model.registry import MODEL_NAMES, build_model
from model.weights import load_weights

__all__ = ["MODEL_NAMES", "build_model", "load_weights"]
