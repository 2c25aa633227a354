"""Data: raw text to tokenized WebDataset shards (Ray), and shards back to a resumable training stream."""
