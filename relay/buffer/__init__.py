"""Experiences between collection and updates: the `Experience` dataclass (one tensor field per quantity, with
its shape) and the ExperienceBuffer Ray actor that holds them, bounded and versioned, hands out shuffled
mini-batches and enforces a staleness limit in asynchronous mode."""
