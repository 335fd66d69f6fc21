"""Ray actors that produce and score rollouts: vLLM generators (`generator.Generator`, one engine per actor),
the weight transport a learner runs to reach the generators (`weight_push.WeightPush`; bucket files in
`weight_sync`), reference/reward scorers and rule or HTTP rewards. vLLM is imported only inside the generator
actor's process (it rewrites environment variables such as LD_PRELOAD on import and spawns processes), so
importing this package, `sampling`, `weight_sync` or `weight_push` stays light and never pulls vLLM into a
driver or a learner.
"""
