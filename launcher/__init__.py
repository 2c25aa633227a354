"""How a job is started: the ``lmscale`` CLI and its backends."""
