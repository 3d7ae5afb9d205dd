"""LoRAs: the `extra_lora` string and fetching it (`sources`), the bounded HTTP client (`http`),
file checks (`files`), the on-disk cache (`cache`) and PEFT adapters on the models (`adapters`).

Nothing is re-exported here: importing `lassie.lora.sources` must not import torch (which
`adapters` needs), so callers import from the module that does the job.
"""
