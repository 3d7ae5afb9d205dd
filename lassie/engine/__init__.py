"""The engine, on torch: the accelerator (`hardware`), the pipelines (`models`), generation (`generate`), go_fast,
compile (`compilation`), the memory plan (`memory`), the runnable transformers (`variants`), the Lassie LoRA and extra
LoRAs from their files to PEFT adapters (`adapters`), the safety filter (`safety`) and the library internals
(`internals`, the only module that may touch them). May import `lassie.request`, `lassie.fetch`, `lassie.settings`,
`lassie.quiet` and `lassie.weights.layout`. Nothing is re-exported: callers import the module that does the job."""
