"""A Ray cluster for vLLM's Ray executor: start, join and stop it (cluster), check it before vLLM
starts on it (preflight), and the commands that do both (cli)."""
