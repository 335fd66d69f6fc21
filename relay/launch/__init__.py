"""What a user runs: the `relay` command line, the pipelines it drives (sft, rm, dpo, ppo) and the Ray cluster
helpers. The driver lives here and talks to actors, learners and the buffer; nothing below imports it."""
