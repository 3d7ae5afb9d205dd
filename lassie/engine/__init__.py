"""The engine, on torch: what the accelerator is (`hardware`), loading the pipelines (`models`),
generation with prompt encoding (`generate`), go_fast (`go_fast`), compile (`compilation`), the
memory plan (`memory`), the runnable transformers (`variants`), the Lassie LoRA and extra LoRAs
from their files to PEFT adapters (`adapters`), the safety filter
(`safety`) and the library internals still needed (`internals`, the only module that may touch them).

May import: `lassie.request`, `lassie.fetch`, `lassie.settings`, `lassie.quiet`, and
`lassie.weights.layout` (the weights directory the models load from). Nothing is re-exported here:
callers import the module that does the job.
"""
