"""Ray actors that produce and score rollouts: vLLM generators (`generator.Generator`, one engine per actor),
the weight transport from learners to generators (`weight_sync.push_weights`), reference/reward scorers and
rule or HTTP rewards. vLLM is imported only inside the generator actor's process (it rewrites environment
variables such as LD_PRELOAD on import and spawns processes), so importing this package, `sampling` or
`weight_sync` stays light and never pulls vLLM into a driver or a learner.
"""
