"""lorakit: LoRA fine-tuning of Hugging Face transformers models from YAML recipes."""

__version__ = "0.1.0"
