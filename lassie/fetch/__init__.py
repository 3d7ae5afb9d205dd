"""Fetching and disk, torch-free: the HTTP client and its address rule, the safetensors check and the one tar policy,
`extra_lora` sources fetched into the LoRA cache, huggingface_hub's errors in words, and where setup may write. May
import `lassie.request.errors` and `lassie.settings`, nothing with torch: requests and setup fetch here before any model
is loaded. Nothing is re-exported: callers import the module that does the job."""
