"""Pure math of RLHF, testable without Ray or a model: advantage estimators (GAE, GRPO, RLOO) in a registry,
KL estimators (k1, k2, k3), and one small function per loss (PPO policy, clipped value, ptx / SFT cross entropy,
pairwise reward-model, DPO / IPO / SimPO). Imports torch and nothing of Relay's."""
