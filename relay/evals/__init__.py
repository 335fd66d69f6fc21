"""Held-out evaluation as pure functions (no Ray, no models): reward-model accuracy on preference pairs,
implicit-reward preference accuracy of a policy against a reference, mean reward / pass rate of a policy's
answers with the spread across prompts, KL to a reference, and the before/after comparisons the demo targets
are stated in. `relay eval` (relay.launch.eval_cmd) and the training loops' `eval_interval` call these."""
