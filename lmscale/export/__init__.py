"""Export: ZeRO checkpoints to Hugging Face-format model directories, and back."""
