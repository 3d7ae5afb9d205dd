"""The engine, on torch: the accelerator, the pipelines and generation, go_fast, compile, the memory plan, the runnable
transformers, LoRA adapters, the safety filter and the library internals (`internals`, the only module that may touch
them). May import `lassie.request`, `lassie.fetch`, `lassie.settings`, `lassie.quiet` and `lassie.weights.layout`."""
