"""Fetching and disk, torch-free: the bounded HTTP client and progress log (`http`) with its address
rule (`addresses`), the safetensors check and LoRA tars (`files`) under the one tar policy (`tars`),
an `extra_lora` string parsed and fetched from where it lives (`lora_sources`), the
on-disk LoRA cache (`lora_cache`), huggingface_hub's errors in words (`hub_errors`) and where setup
may write (`storage`). The adapters that put a fetched LoRA on the models are `lassie.engine.adapters`.

May import: `lassie.request.errors` and `lassie.settings`, nothing with torch: requests fetch
extra LoRAs and setup fetches weights here before any model is loaded. Nothing is re-exported
here: callers import the module that does the job.
"""
