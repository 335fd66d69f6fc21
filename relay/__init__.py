"""Relay: distributed RLHF on Ray, vLLM and ColossalAI."""
