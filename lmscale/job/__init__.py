"""A rank's place in its job and its contract with the launcher that started it: topology from the environment,
stop signals, exit codes. Launchers and ranks share it; it imports neither DeepSpeed nor the trainer."""
