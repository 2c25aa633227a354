"""lmscale: pretrain GPT- and BERT-style language models with DeepSpeed ZeRO on WebDataset shards."""

__version__ = "0.1.0"
