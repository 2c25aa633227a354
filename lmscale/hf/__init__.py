"""Hugging Face formats, below both training (``model.init_from``) and export: each family's key table and
``config.json`` (``gpt``, ``bert``), the dispatch over families (``convert``) and model directories
(``directory``). Imports neither DeepSpeed nor Ray."""
