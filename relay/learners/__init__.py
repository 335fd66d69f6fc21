"""ColossalAI learners.

- `colossal_compat`: patches that make ColossalAI 0.5.0 run on CPU (gloo) under torch 2.13 / transformers 5;
- `policies`: tensor-parallel shard policies for Llama/Qwen2 (module substitutions only);
- `plugins`: the plugin factory and the support rules the config validator shares;
- `group` (driver) / `worker` (one Ray actor per rank) / `lossfn` (loss protocol and registry): learner groups.

ColossalAI is imported only inside this package, and lazily: importing `relay.learners` is cheap.
"""
